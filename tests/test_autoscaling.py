"""Autoscaling, proven locally: load through gRPC raises the drafter's and the verifier's replica
count, the end of load brings both back to one, and no request fails or changes its greedy output
while replicas come and go.

Each live request holds one session on a drafter and one on a verifier replica (serve.replica), so
a replica's ongoing-request count is its live sequences whatever the host's speed: HEAVY streams
keep about HEAVY sessions open on each deployment, one paused stream under one. Short delays and a
short look-back window make Serve decide within seconds. Starting a replica (a Ray worker and its
engine process, both importing their libraries on 2 busy cores) takes what the host takes, so the
test waits first for Serve's decision (a second replica starting), then for it to run. The load is
bounded and loopback only. Nothing here asserts a duration: the deadlines only stop a test that
would otherwise wait forever.
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
START_BUDGET_S = 300  # a decided replica's start (process + engine + model), on a slow busy host
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


def replicas(*states: str) -> dict[str, int]:
    """Replicas of each model deployment in the given states (default RUNNING)."""
    from ray import serve
    from ray.serve.schema import ReplicaState

    from speccascade.serve.launch import APP_NAME

    deployments = serve.status().applications[APP_NAME].deployments
    return {name: sum(deployments[name].replica_states.get(ReplicaState(s), 0)
                      for s in states or ("RUNNING",)) for name in ("Drafter", "Verifier")}


def running_replicas() -> dict[str, int]:
    return replicas()


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


def wait_for(condition, deadline: float, load: Load, seen: list,
             states: tuple[str, ...] = ("RUNNING",)) -> dict[str, int]:
    """Poll Serve until `condition(counts)`, a failure or the deadline; every poll is kept."""
    while True:
        seen.append(counts := replicas(*states))
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
        # Serve decides to scale each deployment to 2 (starting or running, not necessarily at
        # the same poll)...
        decided: list[dict[str, int]] = []
        wait_for(lambda c: all(any(s[n] == 2 for s in decided) for n in c),
                 time.monotonic() + UP_BUDGET_S, load, decided, ("STARTING", "RUNNING"))
        decision = {n: max(s[n] for s in decided) for n in ("Drafter", "Verifier")}
        # ...and, while the load goes on, the new replicas start.
        if decision == {"Drafter": 2, "Verifier": 2}:
            wait_for(lambda c: c == {"Drafter": 2, "Verifier": 2},
                     time.monotonic() + START_BUDGET_S, load, seen)
        peak = {n: max([s[n] for s in seen] or [1]) for n in ("Drafter", "Verifier")}
        # Every stream completes one more request on the grown deployments (new sessions go to
        # the least-loaded replica; requests already running keep theirs).
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
    assert decision == {"Drafter": 2, "Verifier": 2}, f"no scale-up decision under load: {decided}"
    assert peak == {"Drafter": 2, "Verifier": 2}, f"decided replicas did not start: {seen}"
    assert down == {"Drafter": 1, "Verifier": 1}, f"no scale-down after the load: {seen[-5:]}"
    assert served_before_scale_down > 0 and load.done["ok"] > served_before_scale_down
