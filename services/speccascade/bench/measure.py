"""Client-side measurement through the real gRPC service: one stream, or many at once."""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from speccascade.client import SpecCascadeClient


@dataclass
class Run:
    """One streamed request as the client saw it, with the server's stats."""
    token_ids: list[int]
    text: str
    total_ms: float
    ttft_ms: float
    itl_ms: list[float] = field(default_factory=list)   # per token after the first message
    stats: dict = field(default_factory=dict)

    @property
    def non_model_ms_per_round(self) -> float:
        """Round time not spent in model compute on the critical path: RPCs, queues, Python."""
        s = self.stats
        if not s.get("rounds"):
            return 0.0
        hidden = s["overlap_fraction"] * s["draft_ms"]
        critical_model_ms = s["verify_ms"] + s["draft_ms"] - hidden
        return (s["total_ms"] - critical_model_ms) / s["rounds"]


def stream_one(client: SpecCascadeClient, prompt, **fields) -> Run:
    started = time.perf_counter()
    first = last = None
    ids, texts, itl, stats = [], [], [], {}
    for message in client.generate_stream(prompt, **fields):
        now = time.perf_counter()
        if message.token_ids:
            if first is None:
                first = now
            else:
                itl.extend([(now - last) * 1000 / len(message.token_ids)] * len(message.token_ids))
            last = now
        ids.extend(message.token_ids)
        texts.append(message.text)
        if message.HasField("stats"):
            # Every scalar field the server reports (a zero is a field left unset).
            s = message.stats
            stats = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields
                     if isinstance(getattr(s, f.name), (int, float))}
            stats["num_draft_tokens_histogram"] = list(s.num_draft_tokens_histogram)
    total = (time.perf_counter() - started) * 1000
    return Run(ids, "".join(texts), total, ((first or time.perf_counter()) - started) * 1000,
               itl, stats)


def run_concurrent(client, prompts, streams: int, **fields) -> tuple[list[Run], float]:
    """All prompts through `streams` concurrent streams; returns (runs, wall seconds)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        runs = list(pool.map(lambda p: stream_one(client, p, **fields), prompts))
    return runs, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(runs: list[Run]) -> dict:
    tokens = sum(len(r.token_ids) for r in runs)
    seconds = sum(r.total_ms for r in runs) / 1000
    itl = [x for r in runs for x in r.itl_ms]
    agg = {k: sum(r.stats.get(k, 0) for r in runs) for k in
           ("rounds", "drafted", "accepted", "deferrals", "draft_ms", "verify_ms",
            "drafted_ahead", "discarded_draft_tokens")}
    hidden = sum(r.stats.get("overlap_fraction", 0) * r.stats.get("draft_ms", 0) for r in runs)
    rounds = max(agg["rounds"], 1)
    return {
        "requests": len(runs), "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "ttft_ms_p50": statistics.median(r.ttft_ms for r in runs),
        "itl_ms_p50": percentile(itl, 50), "itl_ms_p95": percentile(itl, 95),
        "latency_ms_mean": statistics.fmean(r.total_ms for r in runs),
        "latency_ms_p50": percentile([r.total_ms for r in runs], 50),
        "latency_ms_p95": percentile([r.total_ms for r in runs], 95),
        "acceptance_rate": agg["accepted"] / agg["drafted"] if agg["drafted"] else 0.0,
        "mean_accepted_length": (agg["accepted"] + agg["rounds"]) / rounds if agg["drafted"] else 1.0,
        "deferral_rate": agg["deferrals"] / max(agg["drafted"], 1),
        "round_ms": sum(r.stats.get("total_ms", 0) for r in runs) / rounds,
        "round_draft_ms": agg["draft_ms"] / rounds,
        "round_hidden_draft_ms": hidden / rounds,
        "round_verify_ms": agg["verify_ms"] / rounds,
        "non_model_ms_per_round_p50": statistics.median(r.non_model_ms_per_round for r in runs),
        "overlap_fraction": hidden / agg["draft_ms"] if agg["draft_ms"] else 0.0,
        # Draft-ahead waste: tokens drafted during verification and then thrown away.
        "round_drafted_ahead": agg["drafted_ahead"] / rounds,
        "round_discarded_draft_tokens": agg["discarded_draft_tokens"] / rounds,
    }


def rpc_floor_ms(app_name: str, calls: int = 100, raw_actor: bool = True) -> dict:
    """Empty calls timed in the Router replica (Router.rpc_floor): a data-path ping router →
    engine → router over the path the rounds use ("router_to_verifier" = its p50, "p99_ms",
    "path": ipc or tcp), an empty Serve call to a verifier replica ("serve_call_median_ms"), and
    with `raw_actor` a raw Ray actor call from here. No round can take less non-model time than
    one data-path round trip, since every round waits for at least one verification."""
    import ray
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name).options(method_name="rpc_floor")
    floor = router.remote(calls).result()
    out = {"router_to_verifier": floor["median_ms"], "p99_ms": floor["p99_ms"],
           "serve_call_median_ms": floor["serve_call_median_ms"], "path": floor["path"],
           "calls": floor["calls"]}
    if raw_actor:
        @ray.remote(num_cpus=0)
        class Echo:
            def call(self, value=None):
                return value

        actor = Echo.remote()
        try:
            ray.get(actor.call.remote())  # warm up
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                ray.get(actor.call.remote())
                times.append((time.perf_counter() - started) * 1000)
            out["raw_ray_actor"] = statistics.median(times)
        finally:
            ray.kill(actor)
    return out


def hop_under_load(client, app_name: str, prompts, streams: int, calls: int, **fields) -> dict:
    """`rpc_floor_ms` while `streams` streams run in threads, each sending requests back to back
    until the pings are done: the hop as a round sees it while the engines are busy (a ping waits
    for the forward in progress, as a round's call does)."""
    import threading

    stop = threading.Event()
    tokens = [0] * streams

    def load(i: int) -> None:
        while not stop.is_set():
            tokens[i] += len(stream_one(client, prompts[i % len(prompts)], **fields).token_ids)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # sessions open and the first rounds run
    try:
        floor = rpc_floor_ms(app_name, calls, raw_actor=False)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    floor["streams"] = streams
    floor["load_tokens_per_s"] = sum(tokens) / (time.perf_counter() - started)
    return floor


def _process_name(cmdline: str) -> str | None:
    """Ray titles its workers "ray::<what>[.<running method>]"; Serve replicas
    "ray::ServeReplica:<app>:<deployment>"; engine processes run serve.engine_core <role>."""
    first = cmdline.split(" ")[0]
    if "speccascade.serve.engine_core" in cmdline:
        return f"{cmdline.split()[-1]} engine"
    if first.startswith("ray::"):
        return first[len("ray::"):].split(":")[-1].split(".")[0] or None
    for daemon in ("raylet", "gcs_server"):
        if daemon in first:
            return daemon
    return None


def cpu_seconds_by_process() -> dict[str, float]:
    """User + system CPU seconds of this run's Ray processes by name (Linux /proc): the
    descendants of this process (the Ray cluster it started: raylet, Serve replicas and their
    engine processes), so that other clusters on the machine are not counted; and this process
    (the benchmark's gRPC client) as "client"."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}  # pid -> (ppid, cmdline, cpu seconds)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        procs[int(stat.parent.name)] = (int(fields[1]), cmdline,
                                        (int(fields[11]) + int(fields[12])) / tick)
    ours, me = {}, os.getpid()
    for pid in procs:
        seen, p = [], pid
        while p in procs and p not in ours and p != me and p > 1:
            seen.append(p)
            p = procs[p][0]
        mine = ours.get(p, p == me)
        ours.update(dict.fromkeys(seen, mine))
    found: dict[str, float] = {}
    for pid, (_, cmdline, seconds) in procs.items():
        name = _process_name(cmdline)
        if name and ours.get(pid):
            found[name] = found.get(name, 0.0) + seconds
    own = os.times()
    found["client"] = own.user + own.system
    return found


def cpu_ms_per_round(before: dict[str, float], after: dict[str, float], rounds: int) -> dict[str, float]:
    return {name: (after[name] - before.get(name, 0.0)) * 1000 / max(rounds, 1)
            for name in sorted(after) if after[name] - before.get(name, 0.0) > 0}
