"""The service's pure parts without Ray: config, request validation, status mapping, batching."""
from __future__ import annotations

import math

import grpc
import pytest
from conftest import make_tokenizer

from speccascade.engine.loop import Mode
from speccascade.models.runner import CapacityError, ContextLengthError
from speccascade.sampling import DeferralRule, ParamError
from speccascade.serve import errors
from speccascade.serve.config import ServiceConfig
from speccascade.serve.batching import isolated as _isolated
from speccascade.serve.request import Limits, to_generation_request
from speccascade.serve.router import is_loopback_peer
from speccascade.v1 import generation_pb2 as pb


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def limits(tokenizer):
    return Limits.from_config(ServiceConfig(max_new_tokens=64, max_stop_strings=2,
                                            max_stop_string_chars=8, max_message_bytes=4096),
                              vocab_size=len(tokenizer), max_seq_len=128)


def convert(tokenizer, limits, **fields):
    fields.setdefault("max_new_tokens", 8)
    if "prompt_token_ids" not in fields:
        fields.setdefault("prompt", "def f1(x):")
    return to_generation_request(pb.GenerateRequest(**fields), request_id="r", tokenizer=tokenizer,
                                 limits=limits)


# -- config ------------------------------------------------------------------------------------
def test_config_defaults_are_the_embedded_pair_on_loopback():
    from speccascade.models.fetch import target_dir
    from speccascade.models.loader import DEFAULT_PAIR_DIR

    config = ServiceConfig()
    target, draft = config.model_paths()
    # the target converted at install into the cache folder, the draft shipped in the assets
    assert target == target_dir() and draft == DEFAULT_PAIR_DIR / "draft"
    assert config.host == "127.0.0.1" and config.is_loopback and config.grpc_port == 9000
    options = config.verifier.serve_options()
    assert options["num_replicas"] == 1 and options["ray_actor_options"]["num_gpus"] == 0


@pytest.mark.parametrize("bad", [
    {"verfier": {}},                                                     # typo: unknown key
    {"verifier": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}},
    {"default_num_draft_tokens": 9, "max_num_draft_tokens": 8},
    {"target": {"dtype": "int8"}},
    {"grpc_port": 0},
    {"drafter": {"ray_actor_options": {"num_cpus": -1}}},
    {"router_queue_cap": 1000},                                          # above max_ongoing
    {"verifier": {"max_ongoing_requests": 32}},                          # < max_live_seqs: rejects
    {"transport": {"prefer_ipc": "sometimes"}},
    {"draft_top_k": 0},
    {"draft_ahead_waste_cost": 1.5},
])
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        ServiceConfig.load(bad)


def test_transport_env_reaches_every_deployment():
    from speccascade.serve.app import build_app

    config = ServiceConfig()
    app = build_app(config)
    router = app._bound_deployment
    drafter, verifier = (bound._bound_deployment for bound in router.init_args[:2])
    for deployment, env in ((router, {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                      "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}),
                            (drafter, {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}),
                            (verifier, {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"})):
        assert deployment.ray_actor_options["runtime_env"]["env_vars"] == env
    # Serve's default router (least loaded of two) places sessions: no custom request router
    assert drafter._deployment_config.request_router_config.request_router_class.endswith(
        "PowerOfTwoChoicesRequestRouter")
    off = ServiceConfig.load({"transport": {"user_code_on_main_loop": False,
                                            "router_on_main_loop": False}})
    assert "runtime_env" not in off.router.serve_options(off.transport.env_vars(True))[
        "ray_actor_options"]


def test_config_autoscaling_and_yaml_round_trip(tmp_path):
    config = ServiceConfig.load({"drafter": {"autoscaling_config": {"min_replicas": 1,
                                                                    "max_replicas": 3}}})
    assert "num_replicas" not in config.drafter.serve_options()
    assert ServiceConfig.load(config.model_dump()) == config
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text("applications:\n- name: x\n  import_path: a:b\n  args:\n"
                          "    max_new_tokens: 7\n")
    assert ServiceConfig.load(serve_yaml, grpc_port=9100).max_new_tokens == 7


def test_deploy_serve_yaml_builds_the_app_as_serve_run_does():
    from pathlib import Path

    import yaml
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    [app] = schema.applications
    assert "ingress.add_GenerationServicer_to_server" in \
        schema.grpc_options.grpc_servicer_functions[0]
    assert ServiceConfig.load(path).grpc_port == schema.grpc_options.port
    assert ServiceConfig.load(path).http_port == schema.http_options.port
    assert "ingress.add_HealthServicer_to_server" in schema.grpc_options.grpc_servicer_functions[1]
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert isinstance(built, Application)


# -- request validation ------------------------------------------------------------------------
def test_valid_request_converts(tokenizer, limits):
    request = convert(tokenizer, limits, mode=pb.CASCADE, deferral_rule=pb.DIFF,
                      deferral_threshold=-1.0, temperature=0.5, top_p=0.9, top_k=5, seed=7,
                      stop=["\n\n"], pipelined=False)
    assert request.mode == Mode.CASCADE and request.cascade.rule == DeferralRule.DIFF
    assert request.sampling.seed == 7 and math.isclose(request.sampling.top_p, 0.9, rel_tol=1e-6)
    assert request.num_draft_tokens is None  # the controller's (default_num_draft_tokens unset)
    assert request.stop == ("\n\n",) and not request.pipelined
    assert request.eos_token_ids == frozenset([tokenizer.eos_token_id])
    adaptive = convert(tokenizer, limits, adaptive_num_draft_tokens=True, draft_stop_below=0.4)
    assert adaptive.adaptive and adaptive.max_num_draft_tokens == limits.max_num_draft_tokens
    assert math.isclose(adaptive.draft_stop_below, 0.4, rel_tol=1e-6)


def test_defaults(tokenizer, limits):
    request = convert(tokenizer, limits)
    assert request.mode == Mode.SPECULATIVE and request.cascade is None and request.pipelined is None
    assert request.sampling.greedy and request.sampling.top_p == 1.0
    assert not request.adaptive and request.draft_stop_below == 0.0
    other = convert(tokenizer, limits)
    assert request.sampling.seed != other.sampling.seed  # unset seed: drawn per request


@pytest.mark.parametrize("fields, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "prompt"),
    ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
    ({"prompt_token_ids": [100000]}, "prompt_token_ids"),
    ({"prompt_token_ids": [1] * 200}, "prompt_token_ids"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"max_new_tokens": 65}, "max_new_tokens"),
    ({"prompt_token_ids": [1] * 100, "max_new_tokens": 64}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"mode": 9}, "mode"),
    ({"num_draft_tokens": -1}, "num_draft_tokens"),
    ({"num_draft_tokens": 17}, "num_draft_tokens"),
    ({"mode": pb.CASCADE, "deferral_threshold": 0.1}, "deferral_rule"),
    ({"mode": pb.CASCADE, "deferral_rule": pb.CHOW}, "deferral_threshold"),
    ({"mode": pb.CASCADE, "deferral_rule": 42, "deferral_threshold": 0.1}, "deferral_rule"),
    ({"mode": pb.CASCADE, "deferral_rule": pb.CHOW, "deferral_threshold": 1.5},
     "deferral_threshold"),
    ({"mode": pb.CASCADE, "deferral_rule": pb.OPT, "deferral_threshold": float("inf")},
     "deferral_threshold"),
    ({"deferral_rule": pb.CHOW}, "deferral_rule"),
    ({"deferral_threshold": 0.5}, "deferral_threshold"),
    ({"draft_stop_below": 1.0}, "draft_stop_below"),
    ({"draft_stop_below": -0.1}, "draft_stop_below"),
    ({"temperature": 1.0, "lenience": 0.0}, "lenience"),
    ({"temperature": 1.0, "lenience": 1.5}, "lenience"),
    ({"temperature": 1.0, "lenience": float("nan")}, "lenience"),
    ({"mode": pb.TARGET, "temperature": 1.0, "lenience": 0.5}, "lenience"),
    ({"mode": pb.CASCADE, "deferral_rule": pb.CHOW, "deferral_threshold": 0.0,
      "lenience": 0.5}, "lenience"),
    ({"temperature": 1.0, "min_p": 1.0}, "min_p"),
    ({"temperature": 1.0, "min_p": -0.1}, "min_p"),
    ({"mode": pb.DRAFT, "temperature": 1.0, "min_p": 0.1}, "min_p"),
    ({"temperature": 1.0, "eta": 1.0}, "eta"),
    ({"mode": pb.CASCADE, "deferral_rule": pb.CHOW, "deferral_threshold": 0.0,
      "eta": 1e-3}, "eta"),
    ({"stop": ["a", "b", "c"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["123456789"]}, "stop"),
    ({"prompt": "x" * 5000}, "request"),
])
def test_invalid_fields_name_the_field(tokenizer, limits, fields, field):
    with pytest.raises(ParamError) as error:
        convert(tokenizer, limits, **fields)
    assert error.value.field == field
    code, details = errors.status_for(error.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details


# -- status mapping ----------------------------------------------------------------------------
def test_status_mapping():
    from ray.exceptions import ActorDiedError

    assert errors.status_for(ContextLengthError("too long"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert errors.status_for(CapacityError("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.status_for(errors.QueueFullError("q"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.status_for(TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert errors.status_for(ActorDiedError())[0] == grpc.StatusCode.UNAVAILABLE
    assert errors.status_for(errors.ReplicaFailedError("x"))[0] == grpc.StatusCode.UNAVAILABLE
    assert errors.status_for(errors.PeerNotAllowedError("x"))[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    code, details = errors.status_for(KeyError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in details
    assert errors.status_for(ValueError("no field"))[0] == grpc.StatusCode.INTERNAL


def test_set_status_returns_a_picklable_abort():
    import pickle

    class Context:
        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    context = Context()
    abort = errors.set_status(context, ParamError("top_k", "top_k must be >= 0"))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in context.details
    assert str(pickle.loads(pickle.dumps(abort))) == str(abort)


def test_loopback_peers():
    assert is_loopback_peer("ipv4:127.0.0.1:5000")
    assert is_loopback_peer("ipv4:127.3.4.5:5000")
    assert is_loopback_peer("ipv6:[::1]:5000")
    assert is_loopback_peer("ipv6:%5B::1%5D:49730")                 # grpc 1.85's own form
    assert is_loopback_peer("ipv6:%5B::ffff:127.0.0.1%5D:49730")   # IPv4-mapped
    assert is_loopback_peer("ipv6:[::ffff:127.0.0.1]:5000")
    assert is_loopback_peer("unix:") and is_loopback_peer("unix:/tmp/s.sock")
    assert is_loopback_peer("unix-abstract:speccascade")
    assert not is_loopback_peer("ipv4:10.1.2.3:5000")
    assert not is_loopback_peer("ipv6:%5B2001:db8::1%5D:443")
    assert not is_loopback_peer("ipv6:%5B::ffff:10.0.0.1%5D:443")
    assert not is_loopback_peer("ipv6:%5Bfe80::1%25eth0%5D:443")    # link-local with a zone
    assert not is_loopback_peer("garbage") and not is_loopback_peer("")


def test_loopback_peers_from_real_channels(tmp_path):
    """What a real grpc 1.85 server reports for clients of 127.0.0.1, localhost, [::1] and a unix
    socket (localhost resolves to ::1 first here): each is a loopback peer."""
    import asyncio

    peers = []

    async def run():
        async def handler(request, context):
            peers.append(context.peer())
            return b""

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.Peer", {"Who": grpc.unary_unary_rpc_method_handler(handler)}),))
        port = server.add_insecure_port("[::]:0")  # where Serve's gRPC proxy listens
        sock = tmp_path / "peer.sock"
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        try:
            for target in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}",
                           f"unix:{sock}"):
                async with grpc.aio.insecure_channel(target) as channel:
                    await channel.unary_unary("/t.Peer/Who")(b"", timeout=10)
        finally:
            await server.stop(None)

    asyncio.run(run())
    assert len(peers) == 4
    assert peers[0].startswith("ipv4:127.0.0.1:") and peers[3].startswith("unix:")
    assert any(p.startswith("ipv6:") for p in peers[1:3]), peers  # the URL-encoded form
    assert all(is_loopback_peer(p) for p in peers), peers


def test_loopback_hosts_of_http_clients():
    from speccascade.serve.router import is_loopback_host

    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.53"):
        assert is_loopback_host(host), host
    for host in ("10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1", "", None, "localhost"):
        assert not is_loopback_host(host), host


# -- the HTTP door's mapping -------------------------------------------------------------------
def test_http_status_mapping_and_openai_error_shape():
    from ray.exceptions import ActorDiedError

    cases = [(ParamError("top_p", "top_p must be in (0, 1]"), 400, "top_p"),
             (errors.QueueFullError("router_queue_cap"), 429, None),
             (CapacityError("max_live_seqs"), 429, None),
             (ActorDiedError(), 503, None),
             (errors.ReplicaFailedError("x"), 503, None),
             (TimeoutError(), 504, None),
             (errors.PeerNotAllowedError("loopback only"), 403, None),
             (errors.NotFoundError("model", "no such model"), 404, "model"),
             (KeyError("secret"), 500, None)]
    for exc, status, param in cases:
        got, body = errors.openai_error(exc)
        assert got == status, exc
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param",
                                                                 "code"}
        assert body["error"]["param"] == param and body["error"]["code"] == \
            errors.status_for(exc)[0].name.lower()
    assert "secret" not in errors.openai_error(KeyError("secret"))[1]["error"]["message"]


def test_http_bodies_go_through_the_same_validation(tokenizer, limits):
    from speccascade.serve import http

    def convert_body(body: dict, chat=False):
        import json

        raw = json.dumps(body).encode()
        parsed = http._parse(raw, http.ChatBody if chat else http.CompletionBody)
        prompt = (http.chat_prompt(tokenizer, parsed.messages) if chat
                  else http._completion_prompt(parsed))
        return to_generation_request(http._fields(parsed, len(raw), prompt), request_id="r",
                                     tokenizer=tokenizer, limits=limits)

    body = {"prompt": "def f1(x):", "max_tokens": 8, "temperature": 0, "seed": 3,
            "stop": "\n", "mode": "cascade", "deferral_rule": "chow", "deferral_threshold": 0.1,
            "num_draft_tokens": 3, "pipelined": False}
    request = convert_body(body)
    grpc_request = convert(tokenizer, limits, max_new_tokens=8, seed=3, stop=["\n"],
                           mode=pb.CASCADE, deferral_rule=pb.CHOW, deferral_threshold=0.1,
                           num_draft_tokens=3, pipelined=False)
    assert request == grpc_request  # the same GenerationRequest from either door
    assert convert_body({"prompt": [5, 6, 7], "max_tokens": 2}).prompt_ids == [5, 6, 7]
    # OpenAI's defaults where the body is silent: 16 tokens, temperature 1 (sampled)
    default = convert_body({"prompt": "x"})
    assert default.max_new_tokens == 16 and default.sampling.temperature == 1.0
    for bad, field in [({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "temprature": 0},
                                                          "temprature"),
                       ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
                       ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "x", "mode": "fast"},
                                                            "mode"),
                       ({"prompt": "x", "max_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ParamError) as error:
            convert_body(bad)
        assert error.value.field == field, bad
        renamed = http._renamed(error.value, http.COMPLETION_NAMES)
        assert renamed.field == http.COMPLETION_NAMES.get(field, field)
        assert renamed.field in renamed.message


def test_sampling_baselines_through_both_doors(tokenizer, limits):
    """lenience, min_p and eta: the same GenerationRequest from gRPC and HTTP, the same rejections
    (INVALID_ARGUMENT / HTTP 400 naming the field), unset = off."""
    from speccascade.serve import http

    def convert_body(body: dict):
        import json

        raw = json.dumps({"prompt": "def f1(x):", "max_tokens": 8, "seed": 3, **body}).encode()
        parsed = http._parse(raw, http.CompletionBody)
        received = http._fields(parsed, len(raw), http._completion_prompt(parsed))
        return to_generation_request(received, request_id="r", tokenizer=tokenizer, limits=limits)

    fields = dict(temperature=0.5, lenience=0.25, min_p=0.1, eta=3e-4)
    request = convert_body(fields)
    assert request == convert(tokenizer, limits, seed=3, **fields)
    s = request.sampling
    assert (s.lenience, s.min_p, s.eta) == (0.25, 0.1, 3e-4)  # doubles on both doors: exact
    for unset in (convert(tokenizer, limits).sampling, convert_body({}).sampling,
                  convert_body({"min_p": None, "eta": None, "lenience": None}).sampling):
        assert (unset.lenience, unset.min_p, unset.eta) == (1.0, 0.0, 0.0)
    target = convert_body({"mode": "target", "min_p": 0.1})
    assert target.mode == Mode.TARGET and target.sampling.min_p == 0.1
    for bad, field in [({"lenience": 0}, "lenience"), ({"min_p": 1}, "min_p"),
                       ({"eta": -0.5}, "eta"), ({"mode": "draft", "eta": 0.01}, "eta"),
                       ({"mode": "target", "lenience": 0.5}, "lenience"),
                       ({"min_p": "lots"}, "min_p")]:
        with pytest.raises(ParamError) as error:
            convert_body(bad)
        assert error.value.field == field, bad
        status, answer = errors.openai_error(error.value)
        assert status == 400 and answer["error"]["param"] == field, answer
        assert errors.status_for(error.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ParamError, match=r"SPECULATIVE only; leave it unset for TARGET"):
        convert(tokenizer, limits, mode=pb.TARGET, lenience=0.5)


def test_chat_needs_a_chat_template(tokenizer):
    from conftest import TINY_CHAT_TEMPLATE

    from speccascade.serve.http import ChatMessage, chat_prompt

    messages = [ChatMessage(role="system", content="be brief"),
                ChatMessage(role="user", content=[{"type": "text", "text": "def f1(x):"}])]
    with pytest.raises(ParamError) as error:
        chat_prompt(tokenizer, messages)  # conftest's plain tokenizer has none
    assert error.value.field == "messages" and "chat template" in error.value.message
    templated = make_tokenizer(chat_template=TINY_CHAT_TEMPLATE)
    ids = chat_prompt(templated, messages)["prompt_token_ids"]
    assert templated.decode(ids) == "system: be brief\nuser: def f1(x):\nassistant:"


# -- batch isolation ---------------------------------------------------------------------------
class Item:
    def __init__(self, seq_id, bad=False):
        self.seq_id, self.bad = seq_id, bad


def test_one_bad_request_does_not_fail_its_batch():
    calls = []

    def batch_fn(items):
        calls.append([i.seq_id for i in items])
        if any(i.bad for i in items):
            raise CapacityError("full")
        return [i.seq_id.upper() for i in items]

    results = _isolated(batch_fn, [Item("a"), Item("b", bad=True), Item("c")])
    assert results[0] == "A" and results[2] == "C" and isinstance(results[1], CapacityError)


def test_repeated_sequence_goes_to_separate_forwards():
    calls = []

    def batch_fn(items):
        ids = [i.seq_id for i in items]
        assert len(set(ids)) == len(ids)
        calls.append(ids)
        return ids

    assert _isolated(batch_fn, [Item("a"), Item("a"), Item("b")]) == ["a", "a", "b"]
    assert calls == [["a", "b"], ["a"]]


# -- deadlines and undecodable requests --------------------------------------------------------
def test_within_times_out_and_closes_the_loop():
    import asyncio
    import time

    from speccascade.serve.router import within

    closed = []

    async def slow_loop():
        try:
            for i in range(100):
                await asyncio.sleep(0.05)
                yield i
        finally:  # where engine.loop releases KV entries
            closed.append(True)

    async def run(seconds):
        got = []
        with pytest.raises(TimeoutError):
            async for item in within(slow_loop(), time.monotonic() + seconds):
                got.append(item)
        return got

    got = asyncio.run(run(0.2))
    assert got and len(got) < 100 and closed == [True]
    assert errors.status_for(TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_undecodable_requests_name_the_field(tokenizer, limits):
    from speccascade.serve.ingress import Undecodable, decode_request

    good = pb.GenerateRequest(prompt="x", max_new_tokens=4, stop=["a"]).SerializeToString()
    assert decode_request(good).prompt == "x"
    bad_prompt = pb.GenerateRequest(max_new_tokens=4).SerializeToString() + b"\x0a\x02\xff\xfe"
    bad_stop = good + b"\x62\x01\xff"
    for data, field in ((bad_prompt, "prompt"), (bad_stop, "stop"), (b"\xff\xff", "request")):
        decoded = decode_request(data)
        assert isinstance(decoded, Undecodable) and decoded.field == field
        with pytest.raises(ParamError) as error:
            to_generation_request(decoded, request_id="r", tokenizer=tokenizer, limits=limits)
        assert error.value.field == field


def test_metric_names_and_descriptions_are_ascii():
    """Ray's metrics take ASCII only: a γ in a description fails the router at start."""
    import ast
    from pathlib import Path

    import speccascade.serve.metrics as metrics

    tree = ast.parse(Path(metrics.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", "") in ("Counter", "Gauge", "Histogram")]
    assert len(calls) >= 10
    for call in calls:
        for arg in call.args[:2]:
            assert isinstance(arg, ast.Constant) and arg.value.isascii(), arg.value
