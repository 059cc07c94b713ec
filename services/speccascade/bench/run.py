"""`speccascade bench`: every configuration side by side in one run, on the default pair.

Stages (a progress bar each): step costs in process; the Hugging Face peer and our in-process
engine; then, through the real gRPC service, TARGET / DRAFT / SPECULATIVE sequential and pipelined,
a γ sweep with adaptive γ, cascades over α for each rule with quality, and the speculation-control
sweep over concurrent streams (which gives the concurrency tables).
Results: JSON, BENCHMARKS.md and PNG plots. Timings are ratios measured here in one run.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from speccascade.bench import bounds, profile
from speccascade.bench import service, sweep
from speccascade.bench.host import cpu_features, runner_overhead
from speccascade.bench.measure import rpc_floor_ms, stream_one
from speccascade.bench.peers import engine_generate, hf_generate, sequential_cascade
from speccascade.bench.workload import quality_tasks, throughput_prompts
from speccascade.models.evaluate import (LINE_TOKENS, edit_similarity, exact_match, predicted_line,
                                         step_ms)
from speccascade.sampling import DRAFT_END, SD_END, DeferralRule


@dataclass(frozen=True)
class BenchPlan:
    prompts: int = 12
    new_tokens: int = 96
    gamma: int = 4
    gammas: tuple[int, ...] = (2, 3, 4, 6, 8)
    quality_tasks: int = 48
    alphas_per_rule: int = 4
    # The speculation-control sweep (bench/sweep.py), which also gives the concurrency tables.
    sweep_streams: tuple[int, ...] = (1, 4, 8, 16)
    sweep_gammas: tuple[int, ...] = (1, 2, 4, 6, 8)
    sweep_repeats: int = 2
    sweep_min_requests: int = 4     # requests per cell and repeat: max(streams, this)
    profile_seconds: float = 20.0   # py-spy on the router under single-stream SPECULATIVE
    grpc_port: int = 9123
    http_port: int = 8123       # Serve always starts its HTTP proxy: not 8000, which others use
    target: str | None = None   # local checkpoint paths; None = the embedded default pair
    draft: str | None = None
    dtype: str | None = None    # both models; None = the config default (`auto`)

    @classmethod
    def quick(cls) -> "BenchPlan":
        return cls(prompts=2, new_tokens=16, gammas=(2,), quality_tasks=3, alphas_per_rule=2,
                   sweep_streams=(1, 4), sweep_gammas=(2, 4), sweep_repeats=1,
                   sweep_min_requests=2, profile_seconds=2.0)


def alpha_sweep(rule: DeferralRule, count: int) -> list[float]:
    """From the SD end towards the draft end; OPT's unbounded range gets a practical window."""
    lo, hi = SD_END[rule], DRAFT_END[rule]
    if rule == DeferralRule.OPT:
        lo, hi = -2.0, 2.0
    return [lo + (hi - lo) * i / count for i in range(count)][:count] if count > 1 else [lo]


def _service_config(plan: BenchPlan):
    from speccascade.serve.config import ServiceConfig

    model = {"dtype": plan.dtype} if plan.dtype else {}
    return ServiceConfig.load({"grpc_port": plan.grpc_port, "http_port": plan.http_port,
                               "target": {"path": plan.target, **model},
                               "draft": {"path": plan.draft, **model},
                               "max_live_seqs": 64})


def run_bench(plan: BenchPlan, out_dir: Path) -> dict:
    from speccascade.client import SpecCascadeClient
    from speccascade.engine.engine import Engine
    from speccascade.engine.loop import Mode
    from speccascade.serve import launch

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"plan": plan.__dict__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "host": cpu_features()}
    dtype = plan.dtype or "auto"  # as the service's replicas choose, so the peers compare fairly
    engine = (Engine.from_paths(plan.target, plan.draft, dtype=dtype) if plan.target and plan.draft
              else Engine.default(dtype=dtype))
    target = engine.verifier.worker.runner.model
    draft = engine.drafter.worker.runner.model
    prompts = throughput_prompts(engine.tokenizer, plan.prompts)
    tasks = quality_tasks(engine.tokenizer, plan.quality_tasks)
    n = len(prompts)

    # 1. Step costs and the runner's own cost, in process (one thread, as each replica runs).
    results["steps_ms"] = {"target": step_ms(target), "draft": step_ms(draft),
                           "verify": step_ms(target, new_tokens=plan.gamma + 1)}
    results["runner_overhead"] = {"target": runner_overhead(target, new_tokens=plan.gamma + 1),
                                  "draft": runner_overhead(draft, new_tokens=1)}

    # 2. The peer and our engine, in process.
    peer = {}
    with tqdm(total=4 * n, desc="in-process peers", unit="req") as bar:
        peer["hf_target"] = hf_generate(target, prompts, plan.new_tokens, progress=bar)
        peer["hf_assisted"] = hf_generate(target, prompts, plan.new_tokens, draft=draft,
                                          gamma=plan.gamma, progress=bar)
        peer["engine_target"] = engine_generate(engine, prompts, plan.new_tokens, bar, mode=Mode.TARGET)
        peer["engine_speculative"] = engine_generate(engine, prompts, plan.new_tokens, bar,
                                                     mode=Mode.SPECULATIVE,
                                                     num_draft_tokens=plan.gamma)
    results["in_process"] = {k: {"tokens_per_s": v["tokens_per_s"]} for k, v in peer.items()}
    results["in_process_greedy_equal"] = all(
        _greedy_equal(hf, ours, spec, engine.tokenizer.eos_token_id) for hf, ours, spec in zip(
            peer["hf_target"]["outputs"], peer["engine_target"]["outputs"],
            peer["engine_speculative"]["outputs"]))

    # 3. Through the gRPC service.
    address = launch.start(_service_config(plan))
    try:
        with SpecCascadeClient(address) as client:
            client.generate(prompts[0], max_new_tokens=4)  # warm up every deployment
            results["replicas"] = [{"role": r.role, "dtype": getattr(r, "dtype", "")}
                                   for r in client.stats().replicas]
            results["rpc_floor_ms"] = rpc_floor_ms(launch.APP_NAME)
            results["service"] = _service_runs(client, plan, prompts, tasks, target, engine)
    finally:
        launch.stop()

    # 4. Sequential token-level cascade baseline (in process) for the quality–latency plot.
    results["sequential_cascade"] = _sequential_cascades(plan, tasks, engine, target, draft)
    results["derived"] = derive(results, plan)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _greedy_equal(hf: list[int], target: list[int], speculative: list[int], eos: int) -> bool:
    """Ours must match exactly; HF only up to the first EOS our target emits, because its
    `min_new_tokens` (fixed-length runs) suppresses EOS and picks the runner-up there."""
    end = target.index(eos) if eos in target else len(target)
    return speculative == target and hf[:end] == target[:end]


def _service_runs(client, plan, prompts, tasks, target, engine) -> dict:
    out: dict = {}
    out["speed"], greedy = service.measure_configs(client, prompts, service.speed_configs(plan),
                                                   desc="service: greedy", max_new_tokens=plan.new_tokens)
    # Losslessness through the service: every greedy speculative configuration (and every
    # cascade at its SD end) against TARGET, token for token, and where they part if they do.
    out["greedy_vs_target"] = {name: service.first_divergence(greedy["TARGET"], ids)
                               for name, ids in greedy.items() if name not in ("TARGET", "DRAFT")}
    out["router_profile"] = _router_profile(client, plan, prompts)
    out["sampled"], _ = service.measure_configs(client, prompts, service.sampled_configs(plan),
                                                desc="service: sampled", max_new_tokens=plan.new_tokens)
    out["cascade"] = service.cascade_quality(client, plan, tasks, target, engine)
    out["sweep"] = sweep.run(client, plan, prompts)
    # The concurrency tables: TARGET and the default fixed γ of the sweep.
    greedy = out["sweep"]["greedy"]
    out["concurrency"] = {"TARGET": greedy["TARGET"], "SPECULATIVE": greedy[f"γ={plan.gamma}"]}
    return out


def _router_profile(client, plan, prompts) -> dict:
    """py-spy on the router while single-stream greedy SPECULATIVE (the default) keeps it busy."""
    fields = service.speed_configs(plan)["SPECULATIVE pipelined"]

    def load(seconds: float) -> None:
        started, i = time.time(), 0
        while time.time() - started < seconds:
            stream_one(client, prompts[i % len(prompts)], max_new_tokens=plan.new_tokens, **fields)
            i += 1

    return profile.record(client.stats().router_pid, plan.profile_seconds, load)


def _sequential_cascades(plan, tasks, engine, target, draft) -> dict:
    out = {}
    alphas = alpha_sweep(DeferralRule.CHOW, plan.alphas_per_rule) + [DRAFT_END[DeferralRule.CHOW]]
    with tqdm(total=len(alphas) * len(tasks), desc="sequential cascade", unit="task") as bar:
        for alpha in alphas:
            runs = []
            for task in tasks:
                runs.append(sequential_cascade(target, draft, engine.tokenizer,
                                               engine.encode(task.prompt), alpha=alpha,
                                               max_new_tokens=LINE_TOKENS))
                bar.update()
            preds = [predicted_line(r["text"]) for r in runs]
            out[f"CHOW α={alpha:g}"] = {
                "latency_ms_mean": sum(r["total_ms"] for r in runs) / len(runs),
                "exact_match": sum(map(exact_match, preds, [t.answer for t in tasks])) / len(tasks),
                "edit_similarity": sum(map(edit_similarity, preds, [t.answer for t in tasks])) / len(tasks),
                "deferral_rate": sum(r["deferrals"] for r in runs) / max(1, sum(len(r["token_ids"]) for r in runs)),
            }
    return out


def derive(results: dict, plan: BenchPlan) -> dict:
    """Bounds, efficiencies and the goals of the open issues, as ratios from this one run."""
    svc, steps = results["service"], results["steps_ms"]
    speed, sampled = svc["speed"], svc["sampled"]
    target_tps = speed["TARGET"]["tokens_per_s"]
    seq, pipe = speed["SPECULATIVE sequential"], speed["SPECULATIVE pipelined"]

    def bound(summary) -> tuple[float, float, float]:
        """(α explaining the run's mean accepted length, sequential and pipelined bounds)."""
        alpha = bounds.alpha_from_mean_accepted_length(summary["mean_accepted_length"], plan.gamma)
        args = (alpha, plan.gamma, steps["target"], steps["draft"], steps["verify"])
        return alpha, bounds.sequential_bound(*args), bounds.pipelined_bound(*args)

    alpha, seq_bound, pipe_bound = bound(pipe)
    sampled_alpha, _, sampled_pipe_bound = bound(sampled["SPECULATIVE pipelined"])
    # The measured speedups are over TARGET through the same service, like the bound's baseline.
    pipe_speedup = pipe["tokens_per_s"] / target_tps
    sampled_speedup = sampled["SPECULATIVE pipelined"]["tokens_per_s"] / sampled["TARGET"]["tokens_per_s"]

    def sd_end_ratio(table) -> float:  # the slowest rule at its SD end, against SPECULATIVE
        return service.slowest_sd_end(table, "SPECULATIVE pipelined")[0]

    conc = svc["concurrency"]

    def scaling(mode: str, many: int, few: int) -> float:
        levels = conc[mode]
        return levels[many]["aggregate_tokens_per_s"] / levels[few]["aggregate_tokens_per_s"] \
            if many in levels and few in levels else 0.0

    verifier_bf16 = any(r["role"] == "verifier" and r["dtype"] == "bfloat16" for r in results["replicas"])
    native = results["host"]["native_bf16"] and verifier_bf16
    cascades = svc["cascade"]
    reference, spec_latency = cascades["TARGET"], cascades["SPECULATIVE"]["latency_ms_mean"]
    # "≤ 1 % line-completion loss": exact match and edit similarity within 0.01 of TARGET.
    good = {name: spec_latency / c["latency_ms_mean"] for name, c in cascades.items()
            if c["fields"].get("mode") == "cascade"
            and c["exact_match"] >= reference["exact_match"] - 0.01
            and c["edit_similarity"] >= reference["edit_similarity"] - 0.01}
    best_cascade = max(good, key=good.get) if good else None
    fixed = {name: s["tokens_per_s"] for name, s in speed.items() if name.startswith("SPECULATIVE γ=")}
    best_fixed = max(fixed, key=fixed.get)
    adaptive = {name: speed[name]["tokens_per_s"] / fixed[best_fixed] for name in
                ("SPECULATIVE adaptive γ", "SPECULATIVE adaptive γ + early stop")}
    greedy = svc["greedy_vs_target"]
    return {
        "best_fixed_gamma": best_fixed, "adaptive_over_best_fixed": adaptive,
        "greedy_equal_to_target": all(g["identical"] == g["outputs"] for g in greedy.values()),
        "alpha": alpha, "sampled_alpha": sampled_alpha, "cost_ratio_c": steps["draft"] / steps["target"],
        "sequential_bound": seq_bound, "pipelined_bound": pipe_bound,
        "sampled_pipelined_bound": sampled_pipe_bound, "native_bf16_verifier": native,
        # name -> (measured, goal, "≥" or "≤", issue)
        "goals": {
            "median non-model time per round (ms)": (pipe["non_model_ms_per_round_p50"], 2.5, "≤", 13),
            "router CPU per round (ms)": (pipe["cpu_ms_per_round"].get("Router", 0.0), 2.0, "≤", 13),
            "greedy SPECULATIVE pipelined / pipelined bound": (pipe_speedup / pipe_bound, 0.85, "≥", 13),
            "greedy SPECULATIVE (service) / HF assisted (in process)":
                (pipe["tokens_per_s"] / results["in_process"]["hf_assisted"]["tokens_per_s"], 1.3, "≥", 13),
            "sampled SPECULATIVE / sampled TARGET": (sampled_speedup, 1.25, "≥", 13),
            "sampled SPECULATIVE / its pipelined bound": (sampled_speedup / sampled_pipe_bound, 0.85, "≥", 13),
            "pipelined / sequential": (pipe["tokens_per_s"] / seq["tokens_per_s"], 1.2, "≥", 13),
            "greedy cascade at its SD end (slowest rule) / SPECULATIVE": (sd_end_ratio(speed), 0.95, "≥", 13),
            "8 greedy SPECULATIVE streams / 1 stream": (scaling("SPECULATIVE", 8, 1), 3.5 if native else 2.5, "≥", 14),
            "16 streams / 8 streams": (scaling("SPECULATIVE", 16, 8), 1.0, "≥", 14),
            "8 TARGET streams / 1 TARGET stream": (scaling("TARGET", 8, 1), 2.0, "≥", 14),
            "verifier runner time outside the forward at B=8 / forward":
                (results["runner_overhead"]["target"]["outside_fraction"], 0.10, "≤", 14),
            "sampled cascade at its SD end (slowest rule) / SPECULATIVE": (sd_end_ratio(sampled), 0.95, "≥", 17),
            "best cascade with ≤ 1 % line-completion loss: speed / SPECULATIVE":
                (good.get(best_cascade, 0.0), 1.25, "≥", 17),
            **sweep.goals(svc["sweep"]),
        },
        "best_cascade": best_cascade,
    }
