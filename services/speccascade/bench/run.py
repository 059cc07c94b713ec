"""`speccascade bench`: issue 23's and 24's goals, as ratios from one run on the default pair.

Stages (a progress bar each): step costs and our engine in process (single stream); then through
the real gRPC service on ipc:// (the default transport): the data-path hop idle and under 8 TARGET
streams, a py-spy profile of the router, and the speculation-control sweep — TARGET, fixed γ and the
controller at 1, 4, 8 and 16 streams, greedy and sampled — which gives the single-stream, scaling,
batching and CPU-per-round figures; then a second service on tcp for the transports table
(bench/transports.py). Results: JSON, BENCHMARKS.md and PNG plots. Cascade quality is the
frontier's (`make frontier`, bench/frontier.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from speccascade.bench import profile, sweep, transports
from speccascade.bench.host import cpu_features
from speccascade.bench.measure import hop_under_load, rpc_floor_ms, stream_one
from speccascade.bench.peers import engine_generate
from speccascade.bench.service import first_divergence
from speccascade.bench.workload import throughput_prompts
from speccascade.models.evaluate import step_ms
from speccascade.sampling import DRAFT_END, SD_END, DeferralRule


@dataclass(frozen=True)
class BenchPlan:
    prompts: int = 12
    new_tokens: int = 48
    gamma: int = 4              # SPECULATIVE's fixed γ in the goals and the transports table
    # The speculation-control sweep (bench/sweep.py): every figure through the service but the hop.
    sweep_streams: tuple[int, ...] = (1, 4, 8, 16)
    # Sized for ≤ 40 min on 2 cores with SmolLM2-135M (a target step of about 60 ms here): about
    # 21k tokens, 3/4 of them in the sweep. `speccascade bench --quick` prints this plan's
    # estimate from its own speeds (it errs long: short requests, 4 streams' speed for 8 and 16):
    # 35 min with the 300-step draft (acceptance 0.1 on the quick run's prompts). With a draft that
    # doubles TARGET, `--sweep-repeats 2` (rotated order, less noise for the 0.97 bar) fits too.
    sweep_gammas: tuple[int, ...] = (2, 4, 6)
    sweep_repeats: int = 1
    sweep_min_requests: int = 4     # requests per cell and repeat: max(streams, this)
    hop_calls: int = 100        # under load each ping waits for the forward in progress
    hop_load_streams: int = 8
    profile_seconds: float = 10.0   # py-spy on the router under single-stream SPECULATIVE
    tcp: bool = True                # the transports table's second launch
    grpc_port: int = 9123
    http_port: int = 8123       # Serve always starts its HTTP proxy: not 8000, which others use
    target: str | None = None   # local checkpoint paths; None = the default pair
    draft: str | None = None
    dtype: str | None = None    # both models; None = the config default (`auto`)

    @classmethod
    def quick(cls) -> "BenchPlan":
        return cls(prompts=2, new_tokens=16, sweep_streams=(1, 4), sweep_gammas=(2, 4),
                   sweep_repeats=1, sweep_min_requests=2, hop_calls=20, hop_load_streams=4,
                   profile_seconds=2.0)


def alpha_sweep(rule: DeferralRule, count: int) -> list[float]:
    """From the SD end towards the draft end; OPT's unbounded range gets a practical window."""
    lo, hi = SD_END[rule], DRAFT_END[rule]
    if rule == DeferralRule.OPT:
        lo, hi = -2.0, 2.0
    return [lo + (hi - lo) * i / count for i in range(count)][:count] if count > 1 else [lo]


def _service_config(plan: BenchPlan, prefer_ipc: bool = True):
    from speccascade.serve.config import ServiceConfig

    model = {"dtype": plan.dtype} if plan.dtype else {}
    return ServiceConfig.load({"grpc_port": plan.grpc_port, "http_port": plan.http_port,
                               "target": {"path": plan.target, **model},
                               "draft": {"path": plan.draft, **model},
                               "transport": {"prefer_ipc": prefer_ipc},
                               "max_live_seqs": 64})


def run_bench(plan: BenchPlan, out_dir: Path) -> dict:
    from speccascade.client import SpecCascadeClient
    from speccascade.engine.engine import Engine
    from speccascade.engine.loop import Mode
    from speccascade.serve import launch

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"plan": plan.__dict__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "host": cpu_features(), "stage_s": {}}
    stage = _Stages(results["stage_s"])
    dtype = plan.dtype or "auto"  # as the service's replicas choose, so the engine compares fairly
    engine = (Engine.from_paths(plan.target, plan.draft, dtype=dtype) if plan.target and plan.draft
              else Engine.default(dtype=dtype))
    target = engine.verifier.worker.runner.model
    draft = engine.drafter.worker.runner.model
    prompts = throughput_prompts(engine.tokenizer, plan.prompts)
    n = len(prompts)

    # 1. In process, one thread (as each engine runs): step costs and our engine, single stream.
    with stage("in process"):
        results["steps_ms"] = {"target": step_ms(target), "draft": step_ms(draft),
                               "verify": step_ms(target, new_tokens=plan.gamma + 1)}
        with tqdm(total=2 * n, desc="in-process engine", unit="req") as bar:
            peer = {"engine_target": engine_generate(engine, prompts, plan.new_tokens, bar,
                                                     mode=Mode.TARGET),
                    "engine_speculative": engine_generate(engine, prompts, plan.new_tokens, bar,
                                                          mode=Mode.SPECULATIVE,
                                                          num_draft_tokens=plan.gamma)}
    results["in_process"] = {k: {"tokens_per_s": v["tokens_per_s"]} for k, v in peer.items()}
    results["in_process_greedy_equal"] = (peer["engine_target"]["outputs"]
                                          == peer["engine_speculative"]["outputs"])
    del engine, target, draft, peer

    # 2. Through the gRPC service on ipc://.
    with stage("service start (ipc)"):
        address = launch.start(_service_config(plan))
    try:
        with SpecCascadeClient(address) as client:
            client.generate(prompts[0], max_new_tokens=4)  # warm up every deployment
            results["replicas"] = [{"role": r.role, "dtype": getattr(r, "dtype", "")}
                                   for r in client.stats().replicas]
            with stage("hop"):
                results["hop"] = {
                    "idle": rpc_floor_ms(launch.APP_NAME, plan.hop_calls),
                    "under_load": hop_under_load(client, launch.APP_NAME, prompts,
                                                 plan.hop_load_streams, plan.hop_calls,
                                                 mode="target", max_new_tokens=plan.new_tokens)}
            with stage("router profile"):
                profiled = _router_profile(client, plan, prompts)
            with stage("sweep"):
                results["service"] = {"router_profile": profiled,
                                      "sweep": sweep.run(client, plan, prompts)}
    finally:
        with stage("service stop"):
            launch.stop()

    # 3. The same on tcp (greedy, TARGET / fixed γ / controller).
    if plan.tcp:
        with stage("transports (tcp)"):
            results["tcp"] = transports.run_tcp(plan, prompts, _service_config(plan, False),
                                                prompts[0])
    results["derived"] = derive(results, plan)
    results["estimate_full_s"] = estimate_full_s(results, BenchPlan())
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


class _Stages:
    """Wall seconds per stage, into results["stage_s"] (sizes the plan; see BENCHMARKS.md)."""

    def __init__(self, into: dict):
        self.into = into

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            started = time.perf_counter()
            try:
                yield
            finally:
                self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - started
        return timed()


def estimate_full_s(results: dict, full: BenchPlan) -> dict[str, float]:
    """Each stage of `full` estimated from this run's stage times and cell speeds (run --quick on
    the pair to size the default plan): work in tokens over the speed measured at the nearest
    stream count at or below each level (fewer streams run slower, so this errs long)."""
    plan, stages = results["plan"], results["stage_s"]
    scale = (full.prompts * full.new_tokens) / (plan["prompts"] * plan["new_tokens"])
    est = {"in process": stages.get("in process", 0.0) * scale}

    def cells_s(table: dict, names, repeats: int) -> float:
        fixed = [n for n in table if n.startswith("γ=")]
        total = 0.0
        for name in names:
            measured = table.get(name) or {}
            for streams in full.sweep_streams:
                if measured:
                    levels = sorted(int(k) for k in measured)
                    at = max([n for n in levels if n <= streams] or levels[:1])
                    speed = sweep.cell(table, name, at)["aggregate_tokens_per_s"]
                else:  # a fixed γ this run did not measure: the slowest measured fixed γ
                    speed = min(sweep.cell(table, f, min(int(k) for k in table[f]))[
                        "aggregate_tokens_per_s"] for f in fixed)
                total += repeats * max(streams, full.sweep_min_requests) * full.new_tokens / speed
        return total

    measured_sweep = results["service"]["sweep"]
    est["sweep"] = sum(cells_s(measured_sweep[kind], list(table), full.sweep_repeats)
                       for kind, table in (("greedy", sweep.configs(full.sweep_gammas, False)),
                                           ("sampled", sweep.configs(full.sweep_gammas, True))))
    target_tps = sweep.cell(measured_sweep["greedy"], "TARGET",
                            max(int(k) for k in measured_sweep["greedy"]["TARGET"]))[
        "aggregate_tokens_per_s"]
    est["hop"] = 2 * full.hop_load_streams * full.new_tokens / target_tps + stages.get("hop", 0.0)
    est["router profile"] = full.profile_seconds + stages.get("router profile", 0.0)
    starts = stages.get("service start (ipc)", 0.0) + stages.get("service stop", 0.0)
    est["service start and stop, twice"] = 2 * starts
    if results.get("tcp"):
        est["transports (tcp)"] = cells_s(results["tcp"]["cells"],
                                          list(transports.configs(full)), 1)
    est["total_s"] = sum(est.values())
    return est


def _router_profile(client, plan, prompts) -> dict:
    """py-spy on the router while single-stream greedy SPECULATIVE (fixed γ) keeps it busy."""
    def load(seconds: float) -> None:
        started, i = time.time(), 0
        while time.time() - started < seconds:
            stream_one(client, prompts[i % len(prompts)], max_new_tokens=plan.new_tokens,
                       mode="speculative", num_draft_tokens=plan.gamma)
            i += 1

    return profile.record(client.stats().router_pid, plan.profile_seconds, load)


def greedy_vs_target(greedy: dict) -> dict:
    """Losslessness through the service: every greedy speculative configuration's outputs at
    one stream against TARGET's, token for token (same prompts, same order)."""
    reference = sweep.cell(greedy, "TARGET", 1)["token_ids"]
    return {name: first_divergence(reference, sweep.cell(greedy, name, 1)["token_ids"])
            for name in greedy if name != "TARGET"}


def derive(results: dict, plan: BenchPlan | dict) -> dict:
    """The goals of issues 23 and 24 (and 16's controller / TARGET), as ratios from this run."""
    gamma = plan["gamma"] if isinstance(plan, dict) else plan.gamma
    svc, hop = results["service"], results["hop"]
    greedy, sampled = svc["sweep"]["greedy"], svc["sweep"]["sampled"]
    spec = f"γ={gamma}"

    def at(table, name, streams):
        return sweep.cell(table, name, streams)

    def scaling(name: str, many: int = 8) -> float:
        try:
            return (at(greedy, name, many)["aggregate_tokens_per_s"]
                    / at(greedy, name, 1)["aggregate_tokens_per_s"])
        except KeyError:
            return 0.0

    def over_target(table) -> float:
        return at(table, spec, 1)["tokens_per_s"] / at(table, "TARGET", 1)["tokens_per_s"]

    def rows(name: str, streams: int) -> float:
        try:
            return at(greedy, name, streams)["mean_batch_size"].get("verifier", 0.0)
        except KeyError:
            return 0.0

    verifier_bf16 = any(r["role"] == "verifier" and r["dtype"] == "bfloat16" for r in results["replicas"])
    native = results["host"]["native_bf16"] and verifier_bf16
    one = at(greedy, spec, 1)
    lossless = greedy_vs_target(greedy)
    return {
        "greedy_vs_target": lossless,
        "greedy_equal_to_target": all(g["identical"] == g["outputs"] for g in lossless.values()),
        "native_bf16_verifier": native,
        # name -> (measured, goal, "≥" or "≤", issue)
        "goals": {
            "verifier mean rows per forward, 8 TARGET streams": (rows("TARGET", 8), 4.0, "≥", 23),
            "8 TARGET streams / 1 stream, aggregate tokens/s": (scaling("TARGET"), 2.5, "≥", 23),
            f"8 greedy SPECULATIVE (γ={gamma}) streams / 1 stream":
                (scaling(spec), 3.5 if native else 2.5, "≥", 23),
            "router CPU per round, 1 stream greedy SPECULATIVE (ms)":
                (one["cpu_ms_per_round"].get("Router", 0.0), 1.0, "≤", 23),
            "empty data-path call router → engine → router, p50 (ms)":
                (hop["idle"]["router_to_verifier"], 0.3, "≤", 23),
            "median non-model time per round, 1 stream greedy SPECULATIVE (ms)":
                (one["non_model_ms_per_round_p50"], 3.0, "≤", 23),
            "1 stream greedy SPECULATIVE: service / in-process engine":
                (one["tokens_per_s"] / results["in_process"]["engine_speculative"]["tokens_per_s"],
                 0.9, "≥", 23),
            **sweep.goals(svc["sweep"]),
            f"greedy SPECULATIVE (γ={gamma}) / TARGET, 1 stream": (over_target(greedy), 2.2, "≥", 24),
            f"sampled (T 0.8) SPECULATIVE (γ={gamma}) / TARGET, 1 stream":
                (over_target(sampled), 1.6, "≥", 24),
        },
    }
