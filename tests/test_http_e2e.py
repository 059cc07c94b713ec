"""The front doors end to end, on one real local Ray Serve application (conftest's tiny pair, whose
tokenizer has a chat template): the OpenAI-compatible HTTP API through the official `openai`
client and raw HTTP, the standard gRPC health service through its own client, reflection, and
the loopback check over IPv4, IPv6 and `localhost`.

HTTP and gRPC share validation, so the reliability suite's bad requests (test_reliability.CASES)
must get the same rejection, with the same message, from both doors.
"""
from __future__ import annotations

import json
import math
import re
import socket
import time
from pathlib import Path

import grpc
import pytest
from conftest import running_service, tiny_service_config
from test_reliability import CASES, LIMITS, verify_calls, wait_idle

from speccascade.v1 import generation_pb2 as pb

pytestmark = pytest.mark.e2e

PROMPTS = ["def f1(x):", "def f17(x):\n    return", "    return x * 3"]
CHAT = [{"role": "system", "content": "complete the code"},
        {"role": "user", "content": "def f42(x):"}]


@pytest.fixture(scope="module")
def config(tiny_pair):
    # Rounds travel over the engines' tcp sockets here (the gRPC e2e module uses ipc://): the
    # path a router on another node takes.
    return tiny_service_config(tiny_pair, **LIMITS, transport={"prefer_ipc": False})


@pytest.fixture(scope="module")
def service(config):
    with running_service(config, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(config, service):
    from openai import OpenAI

    with OpenAI(base_url=f"http://localhost:{config.http_port}/v1", api_key="unused",
                max_retries=0, timeout=120) as client:
        yield client


def http(config, path: str, body: dict | bytes | None = None, host: str = "localhost"):
    """(status, parsed JSON or SSE text) of a plain HTTP call."""
    import http.client

    connection = http.client.HTTPConnection(host, config.http_port, timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        connection.request("GET" if body is None else "POST", path, body=data,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    is_json = response.getheader("content-type", "").startswith("application/json")
    return response.status, json.loads(text) if is_json else text


# -- models, completions, chat through the official client -------------------------------------
def test_models_lists_the_served_pair(openai_client):
    [model] = openai_client.models.list().data
    assert model.id == "speccascade" and model.object == "model"
    assert model.model_extra["speccascade"] == {"target": "target", "draft": "draft"}


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_pair[0]))


def test_greedy_completion_equals_grpc_generate(openai_client, service, tokenizer):
    for prompt in PROMPTS:
        reference = service.generate(prompt, max_new_tokens=24, mode="target")
        for mode in ("target", "speculative"):
            reply = openai_client.completions.create(
                model="speccascade", prompt=prompt, max_tokens=24, temperature=0,
                extra_body={"mode": mode, "num_draft_tokens": 3})
            [choice] = reply.choices
            assert choice.text == reference.text, (prompt, mode)
            assert reply.usage.completion_tokens == len(reference.token_ids)
            assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)
                                                    ["input_ids"])
            assert choice.finish_reason == "length"
            stats = reply.model_extra["speccascade"]
            assert stats["rounds"] >= 1 and (stats["drafted"] > 0) == (mode == "speculative")
            # every GenerationStats field, as the gRPC door reports it
            assert set(stats) == {f.name for f in pb.GenerationStats.DESCRIPTOR.fields}


def test_streamed_completion_equals_unary_and_ends_with_done(openai_client, config, service):
    prompt = PROMPTS[1]
    unary = service.generate(prompt, max_new_tokens=24, mode="speculative")
    chunks = list(openai_client.completions.create(
        model="speccascade", prompt=prompt, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"mode": "speculative"}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == unary.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == len(unary.token_ids)
    # On the wire: server-sent events, the last one `data: [DONE]`.
    status, text = http(config, "/v1/completions", {"prompt": prompt, "max_tokens": 4,
                                                    "stream": True, "temperature": 0})
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "speccascade" in json.loads(events[-2][len("data: "):])


def test_chat_applies_the_template_unary_and_streamed(openai_client, service, tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reference = service.generate(ids, max_new_tokens=20, mode="target")
    reply = openai_client.chat.completions.create(model="speccascade", messages=CHAT,
                                                  max_tokens=20, temperature=0)
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == reference.text
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(reference.token_ids)
    chunks = list(openai_client.chat.completions.create(
        model="speccascade", messages=CHAT, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_and_seeded_sampling(openai_client, service):
    prompt = PROMPTS[0]
    full = service.generate(prompt, max_new_tokens=24, mode="target").text
    stop = full[len(full) // 2:][:2]
    assert stop, full
    reply = openai_client.completions.create(model="speccascade", prompt=prompt, max_tokens=24,
                                             temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == full[:full.index(stop)]
    # An explicit γ: a seed reproduces the sample for a given γ (the controller's γ follows load).
    sampled = [openai_client.completions.create(
        model="speccascade", prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.95, seed=7,
        extra_body={"mode": "cascade", "deferral_rule": "CHOW", "deferral_threshold": 0.0,
                    "num_draft_tokens": 4})
        for _ in range(2)]
    grpc_sampled = service.generate(prompt, max_new_tokens=12, temperature=0.9, top_p=0.95,
                                    seed=7, mode="cascade", deferral_rule="CHOW",
                                    deferral_threshold=0.0, num_draft_tokens=4)
    assert sampled[0].choices[0].text == sampled[1].choices[0].text == grpc_sampled.text


# -- bad input: the same rejections as gRPC ----------------------------------------------------
HTTP_NAMES = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt"}


def http_body(fields: dict) -> dict | None:
    """A reliability case as an OpenAI body; None when JSON cannot say it (both prompt forms)."""
    if "prompt" in fields and "prompt_token_ids" in fields:
        return None
    body = {HTTP_NAMES.get(k, k): v for k, v in fields.items()}
    body.setdefault("temperature", 0.0)  # the proto's default; OpenAI's is 1
    if body.get("prompt") is None:
        body.pop("prompt", None)
    return body


def comparable(text: str) -> str:
    """A gRPC or HTTP message with HTTP's field names and numbers at float32 precision (the proto
    carries temperature and top_p as float32: -0.1 arrives as -0.10000000149011612)."""
    for old, new in HTTP_NAMES.items():
        text = text.replace(old, new)
    return re.sub(r"-?\d+\.\d+(e-?\d+)?", lambda m: f"{float(m.group()):.6g}", text)


def test_reliability_bad_inputs_get_the_same_rejection_over_http(config, service):
    before = wait_idle(service)
    generate = service.channel.unary_unary("/speccascade.v1.Generation/Generate")
    tried = 0
    for request, field in CASES:
        if isinstance(request, bytes):
            continue  # protobuf bytes; JSON's counterparts are below
        body = http_body(request)
        if body is None:
            continue
        with pytest.raises(grpc.RpcError) as grpc_error:
            generate(pb.GenerateRequest(**{k: v for k, v in request.items() if v is not None})
                     .SerializeToString(), timeout=30)
        for stream in (False, True):
            status, answer = http(config, "/v1/completions", {**body, "stream": stream})
            error = answer["error"]
            assert status == 400 and error["type"] == "invalid_request_error", (body, answer)
            assert error["param"] == HTTP_NAMES.get(field, field), (body, error)
            assert error["code"] == "invalid_argument"
            if field != "request":  # the size differs: JSON vs protobuf bytes
                assert comparable(error["message"]) == comparable(grpc_error.value.details()), \
                    (body, error, grpc_error.value.details())
            tried += 1
    assert tried >= 2 * 35, tried
    # What only JSON can get wrong, and what only the HTTP door checks.
    for raw, param in [(b'{"prompt": "\xff\xfe"}', "request"), (b"not json", "request"),
                       (json.dumps({"prompt": "x", "temprature": 0}).encode(), "temprature"),
                       (json.dumps({"prompt": "x", "max_tokens": "eight"}).encode(),
                        "max_tokens"),
                       (json.dumps({"prompt": "x", "n": 2}).encode(), "n"),
                       (json.dumps({"prompt": ["a", "b"]}).encode(), "prompt"),
                       (json.dumps({"prompt": "x", "mode": "fastest"}).encode(), "mode"),
                       (json.dumps({"prompt": "x", "temperature": math.nan}).encode(),
                        "temperature")]:
        status, answer = http(config, "/v1/completions", raw)
        assert status == 400 and answer["error"]["param"] == param, (raw, answer)
    status, answer = http(config, "/v1/chat/completions", {"messages": [], "max_tokens": 4})
    assert status == 400 and answer["error"]["param"] == "messages"
    status, answer = http(config, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert status == 404 and answer["error"]["param"] == "model"
    assert identities(wait_idle(service)) == identities(before)  # nothing restarted


def identities(stats):
    return {(r.replica, r.pid) for r in stats.replicas} | {(stats.router_replica,
                                                            stats.router_pid)}


def test_openai_client_raises_its_bad_request_error(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        openai_client.completions.create(model="speccascade", prompt="x", max_tokens=4, n=2)
    assert error.value.status_code == 400 and error.value.body["param"] == "n"


# -- a client that goes away mid-stream frees its KV entries -----------------------------------
@pytest.mark.parametrize("read", [0, 1, 3])
def test_disconnect_mid_stream_stops_the_work_and_frees_kv(config, service, read):
    """Closes the connection after `read` events of a stream, or (0) during a unary request."""
    prompt, length = PROMPTS[1], 160
    rounds = service.generate(prompt, max_new_tokens=length, mode="speculative",
                              num_draft_tokens=1).stats.rounds
    wait_idle(service)
    calls = verify_calls(service)
    body = json.dumps({"prompt": prompt, "max_tokens": length, "temperature": 0,
                       "stream": read > 0, "num_draft_tokens": 1}).encode()
    sock = socket.create_connection(("127.0.0.1", config.http_port), timeout=60)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        received = b""
        while received.count(b"data: ") < read:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert read == 0 or b" 200 " in received.split(b"\r\n")[0]
        end = time.monotonic() + 60
        while not any(r.live_sequences for r in service.stats().replicas):  # mid-generation
            assert time.monotonic() < end
            time.sleep(0.05)
    finally:
        sock.close()
    wait_idle(service)  # every replica released the request's KV entries
    assert verify_calls(service) - calls < rounds  # and the work stopped


# -- gRPC: the standard health service, reflection, loopback over IPv6 -------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_loopback_clients_by_every_name_are_served(config, service, host):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from speccascade.client import SpecCascadeClient

    with SpecCascadeClient(f"{host}:{config.grpc_port}", timeout=60) as client:
        assert client.generate(PROMPTS[0], max_new_tokens=4).token_ids
        health = health_pb2_grpc.HealthStub(client.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
    status, answer = http(config, "/v1/models", host=host.strip("[]"))
    assert status == 200 and answer["data"][0]["id"] == "speccascade"


def test_grpc_health_check_and_watch(config, service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(service.channel)
    Request, Response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    for name in ("", "speccascade.v1.Generation"):
        assert stub.Check(Request(service=name), timeout=30).status == Response.SERVING
    with pytest.raises(grpc.RpcError) as error:
        stub.Check(Request(service="no.such.Service"), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    watch = stub.Watch(Request(service="speccascade.v1.Generation"), timeout=60)
    assert next(watch).status == Response.SERVING
    unknown = stub.Watch(Request(service="no.such.Service"), timeout=60)
    assert next(unknown).status == Response.SERVICE_UNKNOWN
    watch.cancel()
    unknown.cancel()
    end = time.monotonic() + 60
    while service.stats().router_inflight:  # the cancelled watches left the router
        assert time.monotonic() < end
        time.sleep(0.2)


def test_reflection_lists_generation_and_health(config, service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    [answer] = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    names = {s.name for s in answer.list_services_response.service}
    assert {"speccascade.v1.Generation", "grpc.health.v1.Health"} <= names, names
    [found] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="grpc.health.v1.Health")]), timeout=30))
    assert found.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it



def _readme_grpcurl_calls() -> list[tuple[str, dict]]:
    """(method, request JSON) of every `grpcurl … -d '{…}' … service/Method` in the README."""
    readme = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", " ")
    calls = []
    for line in readme.splitlines():
        if line.lstrip().startswith("grpcurl -") and "localhost:" in line:
            body = re.search(r"-d '([^']*)'", line)
            calls.append((re.search(r"(\S+/\w+)", line.split("localhost:")[1]).group(1),
                          json.loads(body.group(1)) if body else {}))
    return calls


def test_readme_grpcurl_calls_work_through_reflection_alone(config, service):
    """What grpcurl does, without grpcurl (not installable here): learn the schema by reflection
    only, parse the README's JSON with protobuf's JSON mapping, call the method by name."""
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    calls = _readme_grpcurl_calls()
    assert {m for m, _ in calls} >= {"speccascade.v1.Generation/GenerateStream",
                                      "grpc.health.v1.Health/Check"}
    reflection = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    pool = descriptor_pool.DescriptorPool()
    for method, body in calls:
        service_name, method_name = method.split("/")
        [found] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=service_name)]), timeout=30)
        for raw in found.file_descriptor_response.file_descriptor_proto:  # dependencies too
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            try:
                pool.FindFileByName(proto.name)
            except KeyError:
                pool.Add(proto)
        rpc = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        Request = message_factory.GetMessageClass(rpc.input_type)
        Response = message_factory.GetMessageClass(rpc.output_type)
        call = (service.channel.unary_stream if rpc.server_streaming else service.channel.unary_unary)(
            f"/{method}", request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString)
        answers = list(call(json_format.ParseDict(body, Request()), timeout=120)) \
            if rpc.server_streaming else [call(json_format.ParseDict(body, Request()), timeout=120)]
        printed = [json_format.MessageToDict(a) for a in answers]  # what grpcurl would print
        if method_name == "Check":
            assert printed == [{"status": "SERVING"}]
        else:
            expected = service.generate(**body).token_ids
            assert [t for a in answers for t in a.token_ids] == list(expected)

def _non_loopback_address() -> str | None:
    """This machine's address on its network (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_non_loopback_clients_are_refused_by_both_doors(config, service):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    from speccascade.client import SpecCascadeClient

    with SpecCascadeClient(f"{address}:{config.grpc_port}", timeout=60) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.generate(PROMPTS[0], max_new_tokens=4)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status, answer = http(config, "/v1/completions", {"prompt": "x"}, host=address)
    assert status == 403 and answer["error"]["type"] == "permission_error", answer
