"""Autoscaling, proven locally: load through gRPC raises the drafter's and the verifier's replica
count, the end of load brings both back to one, and no request fails or changes its greedy output
while replicas come and go (a request whose KV cache is on another replica is re-prefilled from the
router's committed tokens).

Short delays and a short look-back window make Serve react within seconds; the load is bounded
(UP_BUDGET_S + DOWN_BUDGET_S at most, plus 15 s of extra requests on the grown deployments) and
loopback only. Nothing here asserts a duration: the deadlines only stop
a test that would otherwise wait forever.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from conftest import free_port

pytestmark = pytest.mark.e2e

PROMPTS = ["def f1(x):", "def f17(x):\n    return", "    return x * 3", "def f42(x):\n",
           "x * 12 + 5", "def f100(x):\n    return x * 100 + 2", "def f", "return x"]
MAX_NEW = 32
HEAVY = 8            # concurrent client streams while scaling up
LIGHT_PAUSE_S = 0.5  # then one stream, pausing between requests, while scaling down
UP_BUDGET_S, DOWN_BUDGET_S = 50, 25  # the load's bound, per phase
# γ = 1: a draft step and a verify step cost about the same here, so under HEAVY load the calls
# in flight split about evenly between drafter and verifier (several each) and under the light load
# each holds under one. target_ongoing_requests sits between, with margin on both sides.
GAMMA = 1
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
               "upscale_delay_s": 1, "downscale_delay_s": 3,
               "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def service(tiny_pair):
    from speccascade.client import SpecCascadeClient
    from speccascade.serve import launch
    from speccascade.serve.config import ServiceConfig

    target, draft = tiny_pair
    model = {"autoscaling_config": AUTOSCALING, "health_check_period_s": 1.0,
             "ray_actor_options": {"num_cpus": 0.1}}
    config = ServiceConfig.load({
        "target": {"path": str(target), "dtype": "float64"},
        "draft": {"path": str(draft), "dtype": "float64"},
        "grpc_port": free_port(), "http_port": free_port(),
        "drafter": model, "verifier": model,
        "router": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 512}})
    address = launch.start(config, num_cpus=2)
    client = SpecCascadeClient(address, timeout=120)
    try:
        yield client
    finally:
        client.close()
        launch.stop()


def running_replicas() -> dict[str, int]:
    from ray import serve
    from ray.serve.schema import ReplicaState

    from speccascade.serve.launch import APP_NAME

    deployments = serve.status().applications[APP_NAME].deployments
    return {name: deployments[name].replica_states.get(ReplicaState.RUNNING, 0)
            for name in ("Drafter", "Verifier")}


class Load:
    """`streams` client threads generating greedily in a loop; every reply is checked against
    the TARGET reference of its prompt, every failure kept."""

    def __init__(self, client, references: dict[str, list[int]]):
        self.client, self.references = client, references
        self.done, self.failures = Counter(), []
        self.pause_s = 0.0
        self._threads: list[tuple[threading.Thread, threading.Event]] = []

    def add(self, streams: int) -> None:
        for _ in range(streams):
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(len(self._threads), stop))
            self._threads.append((thread, stop))
            thread.start()

    def remove(self, streams: int) -> None:
        for _ in range(streams):
            thread, stop = self._threads.pop()
            stop.set()
            thread.join()

    def _run(self, index: int, stop: threading.Event) -> None:
        i = index
        while not stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            i += 1
            try:
                if i % 2:
                    ids = list(self.client.generate(prompt, max_new_tokens=MAX_NEW,
                                                    mode="speculative",
                                                    num_draft_tokens=GAMMA).token_ids)
                else:
                    ids = [t for part in self.client.generate_stream(
                        prompt, max_new_tokens=MAX_NEW, mode="speculative",
                        num_draft_tokens=GAMMA) for t in part.token_ids]
            except Exception as exc:  # noqa: BLE001 - recorded; the test fails on any
                self.failures.append((prompt, repr(exc)))
            else:
                if ids == self.references[prompt]:
                    self.done["ok"] += 1
                else:
                    self.failures.append((prompt, f"{ids} != {self.references[prompt]}"))
            stop.wait(self.pause_s or 0.0)


def wait_for(condition, deadline: float, load: Load, seen: list) -> dict[str, int]:
    """Poll Serve until `condition(counts)`, a failure or the deadline; every poll is kept."""
    while True:
        seen.append(counts := running_replicas())
        if condition(counts) or load.failures or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


def test_load_scales_both_deployments_up_and_back_down_without_failures(service):
    references = {p: list(service.generate(p, max_new_tokens=MAX_NEW, mode="target").token_ids)
                  for p in PROMPTS}
    assert running_replicas() == {"Drafter": 1, "Verifier": 1}
    load = Load(service, references)
    seen: list[dict[str, int]] = []
    try:
        load.add(HEAVY)
        # Each deployment must reach 2 (not necessarily at the same poll).
        wait_for(lambda c: all(any(s[n] == 2 for s in seen) for n in c),
                 time.monotonic() + UP_BUDGET_S, load, seen)
        peak = {n: max(s[n] for s in seen) for n in ("Drafter", "Verifier")}
        # Every stream completes one more request on the grown deployments (new hash rings:
        # some KV caches are now on the "wrong" replica and get re-prefilled).
        served, until = load.done["ok"], time.monotonic() + 15
        while load.done["ok"] < served + HEAVY and not load.failures and time.monotonic() < until:
            time.sleep(0.1)
        served_before_scale_down = load.done["ok"]
        # Light load keeps requests in flight while the extra replicas drain and stop.
        load.pause_s = LIGHT_PAUSE_S
        load.remove(HEAVY - 1)
        deadline = time.monotonic() + DOWN_BUDGET_S
        down = wait_for(lambda c: c == {"Drafter": 1, "Verifier": 1}, deadline, load, seen)
        # ...and a little longer on the remaining replicas after the others are gone.
        served = load.done["ok"]
        while load.done["ok"] < served + 2 and not load.failures and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        load.remove(len(load._threads))
    assert load.failures == [], load.failures[:5]
    assert peak == {"Drafter": 2, "Verifier": 2}, f"no scale-up within the load budget: {seen}"
    assert down == {"Drafter": 1, "Verifier": 1}, f"no scale-down after the load: {seen[-5:]}"
    assert served_before_scale_down > 0 and load.done["ok"] > served_before_scale_down
