"""End to end: one real local Ray Serve application, called through a real gRPC channel.

The application runs two drafter and two verifier replicas on tiny random checkpoints (conftest's
`tiny_pair`, loaded through the config paths like any model). Greedy SPECULATIVE and CASCADE at the
SD end of α must equal TARGET token for token; streaming must equal unary; concurrent streams,
KV-cache affinity and the fail-over after killing a verifier replica are checked on the same app.
The kill test runs last: it leaves Serve starting a replacement replica.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import running_service, tiny_service_config

pytestmark = pytest.mark.e2e

PROMPTS = ["def f1(x):", "def f17(x):\n    return", "    return x * 3", "def f", "x * 12 + 5",
           "def f42(x):\n", "return x", "def f100(x):\n    return x * 100 + 2", "f9", "+ 6\n"]
MAX_NEW = 24
SD_END = [("CHOW", 0.0), ("DIFF", -1.0), ("TOKEN_V1", -1.0), ("TOKEN_V2", -1.0)]


@pytest.fixture(scope="module")
def service(tiny_pair):
    with running_service(tiny_service_config(tiny_pair)) as client:
        yield client


@pytest.fixture(scope="module")
def references(service):
    """Greedy TARGET output per prompt: the reference every lossless mode must reproduce."""
    return {p: list(service.generate(p, max_new_tokens=MAX_NEW, mode="target").token_ids)
            for p in PROMPTS}


def test_health(service):
    health = service.health()
    assert health.serving, health.detail
    assert health.vocab_size > 0 and health.max_seq_len == 256
    assert health.target_dtype == health.draft_dtype == "float64"  # as configured


def test_greedy_speculative_and_cascade_equal_target(service, references):
    runs = []
    for i, prompt in enumerate(PROMPTS):
        rule, alpha = SD_END[i % len(SD_END)]
        runs += [(prompt, "speculative", {"mode": "speculative", "num_draft_tokens": 4}),
                 (prompt, f"cascade {rule}", {"mode": "cascade", "deferral_rule": rule,
                                              "deferral_threshold": alpha, "num_draft_tokens": 4}),
                 # γ left unset: the speculation controller picks it every round
                 (prompt, "controlled", {"mode": "speculative"}),
                 (prompt, f"controlled cascade {rule}", {"mode": "cascade", "deferral_rule": rule,
                                                         "deferral_threshold": alpha})]
        if i % 3 == 0:  # draft and verify in turn, another γ
            runs.append((prompt, "sequential", {"mode": "speculative", "pipelined": False,
                                                "num_draft_tokens": 3}))

    def run(case):
        prompt, _, fields = case
        return service.generate(prompt, max_new_tokens=MAX_NEW, **fields)

    with ThreadPoolExecutor(4) as pool:  # concurrent requests also share batched forwards
        replies = list(pool.map(run, runs))
    for (prompt, name, fields), reply in zip(runs, replies):
        assert list(reply.token_ids) == references[prompt], (prompt, name)
        stats = reply.stats
        assert sum(stats.num_draft_tokens_histogram) == stats.rounds > 0
        if "num_draft_tokens" in fields:  # an explicit γ is used as given
            gamma = fields["num_draft_tokens"]
            assert stats.drafted > 0
            # every round but the last ≤ γ ones, where max_new_tokens cuts the block
            assert stats.num_draft_tokens_histogram[gamma] >= stats.rounds - gamma
            assert sum(stats.num_draft_tokens_histogram[gamma + 1:]) == 0


def test_sampled_rounds_through_the_service_equal_the_in_process_engine(service, tiny_pair):
    """Seeded sampling (sparse q′ shipped over the configured transport) gives exactly the
    tokens of the in-process engine, which passes the same payloads without Ray."""
    from speccascade.engine.engine import Engine
    from speccascade.engine.loop import Mode
    from speccascade.sampling import CascadeParams, DeferralRule, SamplingParams
    from speccascade.serve.config import ServiceConfig

    config = ServiceConfig()
    engine = Engine.from_paths(*tiny_pair, dtype="float64")
    cases = [("speculative", {}), ("cascade", {"deferral_rule": "TOKEN_V1",
                                               "deferral_threshold": 0.05})]
    for i, prompt in enumerate(PROMPTS[:4]):
        for mode, extra in cases:
            # An explicit γ: the controller's γ follows load, and with it the sample (not the
            # distribution).
            reply = service.generate(prompt, max_new_tokens=MAX_NEW, mode=mode, temperature=0.9,
                                     top_p=0.95, seed=100 + i, num_draft_tokens=4, **extra)
            cascade = (CascadeParams(DeferralRule.TOKEN_V1, 0.05) if mode == "cascade" else None)
            [local] = engine.generate([engine.request(
                prompt, mode=Mode[mode.upper()], max_new_tokens=MAX_NEW, cascade=cascade,
                num_draft_tokens=4,
                sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i),
                draft_top_k=config.draft_top_k)])
            assert list(reply.token_ids) == local.token_ids, (prompt, mode)
            assert reply.stats.drafted > 0


def test_rpc_floor_is_timed_from_the_router_over_its_transport(service):
    from speccascade.bench.measure import rpc_floor_ms
    from speccascade.serve import launch

    floor = rpc_floor_ms(launch.APP_NAME, calls=20)
    assert floor["router_to_verifier"] > 0 and floor["raw_ray_actor"] > 0


def test_stream_concatenation_equals_unary(service):
    for prompt in PROMPTS[:4]:
        unary = service.generate(prompt, max_new_tokens=MAX_NEW, mode="speculative")
        parts = list(service.generate_stream(prompt, max_new_tokens=MAX_NEW, mode="speculative"))
        assert "".join(p.text for p in parts) == unary.text
        assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
        assert parts[-1].finish_reason == unary.finish_reason != 0
        assert all(p.finish_reason == 0 and not p.HasField("stats") for p in parts[:-1])
        assert parts[-1].stats.rounds == len(parts)


def test_eight_concurrent_streams(service, references):
    """With γ unset: the controller on, at 8 streams."""
    def stream(prompt):
        parts = list(service.generate_stream(prompt, max_new_tokens=MAX_NEW, mode="speculative"))
        return [t for p in parts for t in p.token_ids], parts[-1].stats

    def verifier_load():
        replicas = [r for r in service.stats().replicas if r.role == "verifier"]
        return sum(r.batches for r in replicas), sum(r.batched_calls for r in replicas)

    batches_before, calls_before = verifier_load()
    prompts = PROMPTS[:8]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, prompts))
    for prompt, (ids, stats) in zip(prompts, results):
        assert ids == references[prompt], prompt
        assert sum(stats.num_draft_tokens_histogram) == stats.rounds
    batches, calls = verifier_load()
    # Concurrent requests shared verifier forwards: fewer batches than verify calls.
    assert calls - calls_before > batches - batches_before


def test_kv_affinity_one_replica_of_each(service):
    def run(i):
        return service.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=12,
                                mode="speculative", num_draft_tokens=4).stats.replicas

    with ThreadPoolExecutor(4) as pool:
        replica_sets = list(pool.map(run, range(16)))
    drafters, verifiers = set(), set()
    for replicas in replica_sets:
        d = [r for r in replicas if r.startswith("drafter:")]
        v = [r for r in replicas if r.startswith("verifier:")]
        assert len(d) == 1 and len(v) == 1, replicas  # every call of a request hit one replica
        drafters.update(d)
        verifiers.update(v)
    # ...and requests spread over both replicas of each (Serve routes sessions to the less loaded)
    assert len(drafters) == 2 and len(verifiers) == 2
    # Every finished request released its KV entries on every replica.
    stats = service.stats()
    assert sorted(r.role for r in stats.replicas) == ["drafter"] * 2 + ["verifier"] * 2
    assert all(r.live_sequences == 0 for r in stats.replicas), stats
    # ...and their KV tokens: the preallocated slabs are back at zero use
    assert all(r.kv_tokens_used == 0 < r.kv_tokens_total for r in stats.replicas), stats


def test_invalid_requests_answer_invalid_argument(service):
    cases = [({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
             ({"prompt": None, "max_new_tokens": 4}, "prompt"),
             ({"prompt": "x", "max_new_tokens": 4, "temperature": -1.0}, "temperature"),
             ({"prompt": "x", "max_new_tokens": 4, "mode": "cascade"}, "deferral_rule"),
             ({"prompt": [10 ** 6], "max_new_tokens": 4}, "prompt_token_ids")]
    for fields, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            service.generate(**fields)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert field in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            list(service.generate_stream(**fields))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
    assert service.generate("def f1(x):", max_new_tokens=4).token_ids  # still serving


def test_killing_the_verifier_replica_mid_stream_keeps_greedy_output(service):
    import ray

    prompt, length = "def f3(x):", 200
    reference = list(service.generate(prompt, max_new_tokens=length, mode="target").token_ids)
    stream = service.generate_stream(prompt, max_new_tokens=length, mode="speculative",
                                     num_draft_tokens=2)
    first = next(stream)
    # The only request in flight: the verifier replica holding a live sequence holds it.
    holders = [r.replica for r in service.stats().replicas
               if r.role == "verifier" and r.live_sequences > 0]
    assert len(holders) == 1, holders
    ray.kill(ray.get_actor(holders[0], namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    parts = [first, *stream]
    assert [t for p in parts for t in p.token_ids] == reference
    replicas = list(parts[-1].stats.replicas)
    # The request moved: it used the killed replica and then another one, mid-stream.
    assert f"verifier:{holders[0]}" in replicas
    assert len([r for r in replicas if r.startswith("verifier:")]) == 2, replicas
    assert time.monotonic() - killed_at < 60
