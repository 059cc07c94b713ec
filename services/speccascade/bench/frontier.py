"""`speccascade bench frontier`: the quality–latency frontier of speculative cascades, with CIs.

Every configuration (TARGET, DRAFT, SPECULATIVE and the six rules over their α range, greedy and
sampled; the sequential cascade, greedy, in process) completes the same held-out lines with the
same per-task seeds. Quality:

- exact match and edit similarity of the predicted line (models/evaluate.py), and
- the target's mean log-likelihood per token of the continuation up to the end of that line,
  scored afterwards in process (one prompt forward per task, every distinct output in one batch).

Each stream stops once its line is complete: later tokens cannot change any metric. Every metric
is compared with TARGET of the same decoding by a paired bootstrap 95 % CI.

Where quality runs (`quality_on`): through the gRPC service, `streams` tasks at a time, the full
plan takes about 110 min on 2 CPU cores (the verifier serializes its calls: mean batch 1.0), so
by default the quality pass runs the same loop, front-door validation, workers and sampler in
process with `chunk` tasks sharing each forward, and the first `service_check_tasks` tasks of
every configuration also go through the service, which must give the same outputs (reported).

Speed, through the service: with many streams a request's latency depends on what it is batched
with, so latency relative to TARGET is 1 / (tokens/s relative to TARGET) of a single-stream pass
over a fixed subset of tasks at full length, interleaved over the configurations `speed_rounds`
times (a burst of load from elsewhere then skews every configuration, not one). Every rule at its
SD end is timed too: its rounds do SPECULATIVE's verification and should cost the same.

Lossy speculative decoding (Leviathan et al.'s lenience, accept with min(1, p / (l·q))) is not a
baseline here: it needs a lenience input to the acceptance test in sampling.py and a request field.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from speccascade.bench.measure import stream_one, summarize
from speccascade.bench.run import alpha_sweep
from speccascade.bench.service import SAMPLED, sd_end_cascades, slowest_sd_end
from speccascade.bench.workload import quality_tasks
from speccascade.models.evaluate import (LINE_TOKENS, continuation_log_likelihoods,
                                         edit_similarity, exact_match, line_complete,
                                         line_token_count, paired_bootstrap_ci, predicted_line)
from speccascade.sampling import SD_END, DeferralRule

METRICS = {"target_loglik": "target log-likelihood (nats/token)",
           "edit_similarity": "edit similarity", "exact_match": "exact match"}
MAX_LOSS = 0.01  # "within 1 % of TARGET": the upper CI bound of the relative loss


@dataclass(frozen=True)
class FrontierPlan:
    tasks: int = 1000
    alphas_per_rule: int = 3      # α values strictly between the SD end and the draft end
    quality_on: str = "engine"    # "engine": in process, batched; "service": through gRPC
    chunk: int = 200              # in-process tasks started together (their prefills batch)
    service_check_tasks: int = 24  # quality_on "engine": these first tasks also via the service
    streams: int = 8              # concurrent quality streams through the service
    speed_tasks: int = 16         # single-stream speed subset (the first tasks)
    speed_rounds: int = 2
    seq_tasks: int = 100          # the in-process sequential cascade (one token per Python step)
    gamma: int = 4
    seed: int = 1234              # task i of a sampled run has seed + i
    stop_at_line_end: bool = True  # cancel each stream once its line is complete (same metrics)
    grpc_port: int = 9124
    http_port: int = 8124         # Serve always starts its HTTP proxy: not 8000, which others use
    target: str | None = None
    draft: str | None = None
    dtype: str | None = None      # service replicas; None = the config default

    @classmethod
    def quick(cls, **kw) -> "FrontierPlan":
        return cls(tasks=6, alphas_per_rule=1, chunk=4, service_check_tasks=3, streams=4,
                   speed_tasks=2, speed_rounds=1, seq_tasks=3, **kw)


def alphas(rule: DeferralRule, count: int) -> list[float]:
    """count α values of the bench's grid, without its SD end (SPECULATIVE measures that)."""
    return alpha_sweep(rule, count + 1)[1:]


def _sampled_fields(sampled: bool) -> dict:
    """The sampled decoding's fields; the seed is per task (`seeded`)."""
    return {k: v for k, v in SAMPLED.items() if k != "seed"} if sampled else {}


def configs(plan: FrontierPlan, sampled: bool) -> dict[str, dict]:
    """name -> {"fields": request fields, "rule", "alpha"}: the service configurations."""
    extra = _sampled_fields(sampled)
    out = {"TARGET": {"fields": dict(mode="target", **extra)},
           "DRAFT": {"fields": dict(mode="draft", **extra)},
           "SPECULATIVE": {"fields": dict(mode="speculative", num_draft_tokens=plan.gamma, **extra)}}
    for rule in DeferralRule:
        for alpha in alphas(rule, plan.alphas_per_rule):
            out[f"{rule.name} α={alpha:g}"] = {
                "rule": rule.name, "alpha": alpha,
                "fields": dict(mode="cascade", deferral_rule=rule.name, deferral_threshold=alpha,
                               num_draft_tokens=plan.gamma, **extra)}
    return out


def speed_configs(plan: FrontierPlan, sampled: bool) -> dict[str, dict]:
    """The quality configurations plus every rule at its SD end (timed only: its π is p)."""
    extra = _sampled_fields(sampled)
    ends = {name: {"fields": fields, "rule": fields["deferral_rule"],
                   "alpha": fields["deferral_threshold"], "sd_end": True}
            for name, fields in sd_end_cascades(plan.gamma, **extra).items()}
    return {**configs(plan, sampled), **ends}


def seeded(fields: dict, plan: FrontierPlan, task: int) -> dict:
    return {**fields, "seed": plan.seed + task} if fields.get("temperature") else fields


def complete_line(client, prompt: str, cancel: bool = True, **fields) -> dict:
    """Stream until the predicted line is complete, then cancel the rest of the stream (or, with
    cancel=False, read it to its end: the metrics only look at the tokens up to the line's end)."""
    started = time.perf_counter()
    ids, text = [], ""
    stream = client.generate_stream(prompt, max_new_tokens=LINE_TOKENS, **fields)
    for message in stream:
        ids.extend(message.token_ids)
        text += message.text
        if cancel and line_complete(text):
            stream.cancel()
            break
    return {"token_ids": ids, "text": text, "ms": (time.perf_counter() - started) * 1000}


def quality_pass(client, plan, tasks, table: dict, desc: str) -> dict[str, list[dict]]:
    """Every configuration over every task, plan.streams requests at a time (one queue for all
    configurations, so the streams stay busy across their boundaries): {name: [run per task]}."""
    jobs = [(name, i) for name in table for i in range(len(tasks))]
    with tqdm(total=len(jobs), desc=desc, unit="task") as bar, \
            ThreadPoolExecutor(max_workers=plan.streams) as pool:
        def one(job):
            name, i = job
            run = complete_line(client, tasks[i].prompt, plan.stop_at_line_end,
                                **seeded(table[name]["fields"], plan, i))
            bar.update()
            return run
        runs = list(pool.map(one, jobs))
    return {name: runs[k * len(tasks):(k + 1) * len(tasks)] for k, name in enumerate(table)}


def engine_quality_pass(engine, plan, tasks, table: dict, desc: str) -> dict[str, list[dict]]:
    """quality_pass in process: each request passes the service's own validation
    (serve.request.to_generation_request) and runs the same loop, workers and sampler; plan.chunk
    tasks of one configuration start together and share forwards."""
    import asyncio

    from speccascade.client import make_request
    from speccascade.engine.loop import generate
    from speccascade.serve.request import Limits, to_generation_request

    vocab = engine.verifier.worker.runner.model.config.vocab_size
    limits = Limits.from_config(_service_config(plan), vocab_size=vocab,
                                max_seq_len=engine.max_seq_len)

    async def one(name: str, i: int) -> dict:
        request = to_generation_request(
            make_request(tasks[i].prompt, max_new_tokens=LINE_TOKENS,
                         **seeded(table[name]["fields"], plan, i)),
            request_id=f"{name}/{i}", tokenizer=engine.tokenizer, limits=limits)
        started = time.perf_counter()
        ids, text = [], ""
        stream = generate(request, engine.drafter, engine.verifier, engine.tokenizer,
                          engine.controller)
        try:
            async for delta in stream:
                ids.extend(delta.token_ids)
                text += delta.text
                if plan.stop_at_line_end and line_complete(text):
                    break
        finally:
            await stream.aclose()  # releases the KV entries on both sides
        return {"token_ids": ids, "text": text, "ms": (time.perf_counter() - started) * 1000}

    async def chunk(name: str, start: int) -> list[dict]:
        return await asyncio.gather(*(one(name, i) for i in
                                      range(start, min(start + plan.chunk, len(tasks)))))

    out = {}
    with tqdm(total=len(table) * len(tasks), desc=desc, unit="task") as bar:
        for name in table:
            out[name] = []
            for start in range(0, len(tasks), plan.chunk):
                out[name] += asyncio.run(chunk(name, start))
                bar.update(min(plan.chunk, len(tasks) - start))
    return out


def service_agreement(engine_runs: dict, service_runs: dict) -> dict:
    """How far the service's outputs for the same tasks and seeds match the in-process ones."""
    out = {}
    for name, served in service_runs.items():
        here = engine_runs[name][:len(served)]
        out[name] = {"tasks": len(served),
                     "identical": sum(a["token_ids"] == b["token_ids"] for a, b in zip(here, served)),
                     "same_line": sum(predicted_line(a["text"]) == predicted_line(b["text"])
                                      for a, b in zip(here, served))}
    return out


def speed_pass(client, plan, tasks, table: dict, desc: str) -> dict[str, dict]:
    """Single stream, full length, configurations interleaved in each of plan.speed_rounds."""
    runs: dict[str, list] = {name: [] for name in table}
    subset = tasks[:plan.speed_tasks]
    with tqdm(total=plan.speed_rounds * len(table) * len(subset), desc=desc, unit="req") as bar:
        for _ in range(plan.speed_rounds):
            for name, config in table.items():
                for i, task in enumerate(subset):
                    runs[name].append(stream_one(client, task.prompt, max_new_tokens=LINE_TOKENS,
                                                 **seeded(config["fields"], plan, i)))
                    bar.update()
    return {name: summarize(r) for name, r in runs.items()}


FRONTIER_CONTEXT = 1024  # tokens per in-process KV slot: a task's prompt and its line


def _service_config(plan: FrontierPlan):
    from speccascade.serve.config import ServiceConfig

    model = {"dtype": plan.dtype} if plan.dtype else {}
    return ServiceConfig.load({"grpc_port": plan.grpc_port, "http_port": plan.http_port,
                               "target": {"path": plan.target, **model},
                               "draft": {"path": plan.draft, **model},
                               "default_num_draft_tokens": plan.gamma,
                               # the service check's streams plus sequences still releasing
                               "max_live_seqs": max(64, 2 * plan.streams)})


def sequential_runs(engine, plan, tasks) -> tuple[dict, dict]:
    """The in-process sequential cascade (Chow, greedy) on the first plan.seq_tasks tasks, and its
    tokens/s beside the in-process engine's TARGET on the speed subset (single stream)."""
    from speccascade.bench.peers import engine_generate, sequential_cascade
    from speccascade.engine.loop import Mode

    target = engine.verifier.worker.runner.model
    draft = engine.drafter.worker.runner.model
    grid = alphas(DeferralRule.CHOW, plan.alphas_per_rule)
    speed_prompts = [engine.encode(t.prompt) for t in tasks[:plan.speed_tasks]]
    runs, speed = {}, {}
    reference = engine_generate(engine, speed_prompts, LINE_TOKENS, mode=Mode.TARGET)
    speed["TARGET (in process)"] = {"tokens_per_s": reference["tokens_per_s"]}
    with tqdm(total=len(grid) * (plan.seq_tasks + len(speed_prompts)), desc="sequential cascade",
              unit="task") as bar:
        for alpha in grid:
            name = f"SEQUENTIAL CHOW α={alpha:g}"
            out = []
            for task in tasks[:plan.seq_tasks]:
                r = sequential_cascade(target, draft, engine.tokenizer, engine.encode(task.prompt),
                                       alpha=alpha, max_new_tokens=LINE_TOKENS)
                out.append({"token_ids": r["token_ids"], "text": r["text"], "ms": r["total_ms"]})
                bar.update()
            runs[name] = out
            tokens = seconds = 0.0
            for prompt in speed_prompts:
                r = sequential_cascade(target, draft, engine.tokenizer, prompt, alpha=alpha,
                                       max_new_tokens=LINE_TOKENS)
                tokens, seconds = tokens + len(r["token_ids"]), seconds + r["total_ms"] / 1000
                bar.update()
            speed[name] = {"tokens_per_s": tokens / seconds if seconds else 0.0,
                           "alpha": alpha, "rule": "CHOW"}
    return runs, speed


def score(engine, tasks, decodings: dict[str, dict[str, list[dict]]]) -> None:
    """Adds per-task metrics to every run in place; the log-likelihood over the line's tokens."""
    target = engine.verifier.worker.runner.model
    tok = engine.tokenizer
    for runs in (r for table in decodings.values() for r in table.values()):
        for task, run in zip(tasks, runs):
            pred = predicted_line(run["text"])
            run["exact_match"] = exact_match(pred, task.answer)
            run["edit_similarity"] = edit_similarity(pred, task.answer)
            run["line_ids"] = run["token_ids"][:line_token_count(tok, run["token_ids"])]
    for i, task in enumerate(tqdm(tasks, desc="target log-likelihood", unit="task")):
        here = [runs[i] for table in decodings.values() for runs in table.values() if i < len(runs)]
        for run, value in zip(here, continuation_log_likelihoods(
                target, engine.encode(task.prompt), [r["line_ids"] for r in here])):
            run["target_loglik"] = value


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (latency, quality) that no other point beats: none is at least as
    fast and at least as good, and strictly better in one. Sorted by latency."""
    def beaten(a):
        xa, ya = points[a]
        return any(xb <= xa and yb >= ya and (xb < xa or yb > ya)
                   for b, (xb, yb) in points.items() if b != a)
    return sorted((n for n in points if not beaten(n)), key=lambda n: points[n])


def analyse(plan, quality: dict, speed: dict) -> dict:
    """Per decoding: each configuration's means, paired CIs against TARGET, latency relative to
    TARGET, the metrics whose CI separates DRAFT from TARGET, the Pareto front and the knob."""
    out = {}
    for decoding, table in quality.items():
        ref = table["TARGET"]
        target_tps = speed[decoding]["TARGET"]["tokens_per_s"]
        spec_tps = speed[decoding]["SPECULATIVE"]["tokens_per_s"]
        rows = {}
        for name, runs in table.items():
            s = speed[decoding].get(name, {})
            tps = s.get("tokens_per_s", 0.0)
            # The sequential cascade runs in process: its latency is against in-process TARGET.
            base = speed[decoding].get("TARGET (in process)", {}).get("tokens_per_s") \
                if name.startswith("SEQUENTIAL") else target_tps
            row = {"tasks": len(runs), "rule": s.get("rule"), "alpha": s.get("alpha"),
                   "tokens_per_s": tps, "latency_vs_target": base / tps if tps else math.inf,
                   "speed_vs_speculative": tps / spec_tps if not name.startswith("SEQUENTIAL")
                   and spec_tps else None,
                   "quality_ms_mean": statistics.fmean(r["ms"] for r in runs)}
            for metric in METRICS:
                values = [r[metric] for r in runs]
                row[metric] = statistics.fmean(v for v in values if not math.isnan(v))
                row[f"{metric}_ci"] = paired_bootstrap_ci(values, [r[metric] for r in ref[:len(runs)]])
            rows[name] = row
        separating = [m for m in METRICS if rows["DRAFT"][f"{m}_ci"]["hi"] < 0]
        out[decoding] = {
            "rows": rows, "separating_metrics": separating,
            "pareto": {m: pareto_front({n: (r["latency_vs_target"], r[m]) for n, r in rows.items()
                                        if math.isfinite(r["latency_vs_target"])}) for m in METRICS},
            "knob": {m: knob(rows, m) for m in separating}}
    return out


def knob(rows: dict, metric: str) -> dict:
    """Per rule: the most lenient measured α whose relative loss against TARGET, and that of every
    α between it and the SD end, stays ≤ 1 % at the upper CI bound; None where none does."""
    out = {}
    for rule in DeferralRule:
        measured = sorted((r for r in rows.values() if r["rule"] == rule.name and
                           r["speed_vs_speculative"] is not None),
                          key=lambda r: abs(r["alpha"] - SD_END[rule]))
        best = None
        for r in measured:
            if r[f"{metric}_ci"]["rel_loss_hi"] > MAX_LOSS:
                break
            best = r
        out[rule.name] = None if best is None else {
            "alpha": best["alpha"], "rel_loss_hi": best[f"{metric}_ci"]["rel_loss_hi"],
            "latency_vs_target": best["latency_vs_target"],
            "speed_vs_speculative": best["speed_vs_speculative"]}
    return out


def best_cascade(analysis: dict) -> dict | None:
    """For BENCHMARKS.md's goal: the fastest cascade (speed vs SPECULATIVE) whose relative loss
    against TARGET is ≤ 1 % at the upper CI bound on some metric whose CI separates DRAFT from
    TARGET; None if none is."""
    found = [{"name": name, "metric": m, "speed_vs_speculative": r["speed_vs_speculative"],
              "rel_loss_hi": r[f"{m}_ci"]["rel_loss_hi"]}
             for name, r in analysis["rows"].items() for m in analysis["separating_metrics"]
             if r["rule"] and r["speed_vs_speculative"] is not None
             and r[f"{m}_ci"]["rel_loss_hi"] <= MAX_LOSS]
    return max(found, key=lambda f: f["speed_vs_speculative"], default=None)


def run_frontier(plan: FrontierPlan, out_dir: Path, *, estimate_for: FrontierPlan | None = None) -> dict:
    import torch

    from speccascade.client import SpecCascadeClient
    from speccascade.engine.engine import Engine
    from speccascade.serve import launch

    if plan.quality_on not in ("engine", "service"):
        raise ValueError(f"quality_on must be 'engine' or 'service', got {plan.quality_on!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(target_path=plan.target, draft_path=plan.draft) if plan.target and plan.draft else {}
    # KV slots sized to line completion (prompt + line), not the model context: 64 slots of 2048
    # fp32 positions of the 135 M target alone are 6 GB.
    kv = dict(max_live_seqs=8, max_seq_len=FRONTIER_CONTEXT)
    engine = (Engine.from_paths(**paths, dtype="float32", **kv) if paths
              else Engine.default(dtype="float32", **kv))
    tasks = quality_tasks(engine.tokenizer, plan.tasks)
    tables = {"greedy": configs(plan, False), "sampled": configs(plan, True)}
    speed_tables = {"greedy": speed_configs(plan, False), "sampled": speed_configs(plan, True)}
    timings: dict[str, float] = {}
    quality, speed, served = {}, {}, {}
    if plan.quality_on == "engine":
        # The replicas' dtype ("auto" as the service resolves it), every core, nothing else running.
        torch.set_num_threads(os.cpu_count() or 1)
        kw = dict(dtype=plan.dtype or "auto", max_live_seqs=max(8, plan.chunk),
                  max_seq_len=FRONTIER_CONTEXT)
        batched = Engine.from_paths(**paths, **kw) if paths else Engine.default(**kw)
        started = time.perf_counter()
        for decoding, table in tables.items():
            quality[decoding] = engine_quality_pass(batched, plan, tasks, table,
                                                    f"quality (in process): {decoding}")
        timings["quality_s"] = time.perf_counter() - started
        del batched
    torch.set_num_threads(1)  # in-process speed as one replica runs
    address = launch.start(_service_config(plan))
    try:
        with SpecCascadeClient(address) as client:
            client.generate(tasks[0].prompt, max_new_tokens=4)  # warm up every deployment
            started = time.perf_counter()
            if plan.quality_on == "service":
                for decoding, table in tables.items():
                    quality[decoding] = quality_pass(client, plan, tasks, table,
                                                     f"quality: {decoding}")
                timings["quality_s"] = time.perf_counter() - started
            else:
                check = tasks[:plan.service_check_tasks]
                for decoding, table in tables.items():
                    served[decoding] = service_agreement(quality[decoding], quality_pass(
                        client, plan, check, table, f"service check: {decoding}"))
                timings["service_check_s"] = time.perf_counter() - started
            started = time.perf_counter()
            for decoding, table in speed_tables.items():
                speed[decoding] = speed_pass(client, plan, tasks, table, f"speed: {decoding}")
            timings["speed_s"] = time.perf_counter() - started
    finally:
        launch.stop()
    started = time.perf_counter()
    seq_runs, seq_speed = sequential_runs(engine, plan, tasks)
    quality["greedy"].update(seq_runs)
    speed["greedy"].update(seq_speed)
    timings["sequential_s"] = time.perf_counter() - started
    started = time.perf_counter()
    score(engine, tasks, quality)
    timings["score_s"] = time.perf_counter() - started
    for decoding, table in speed_tables.items():
        for name, config in table.items():
            speed[decoding][name].update(rule=config.get("rule"), alpha=config.get("alpha"),
                                         sd_end=config.get("sd_end", False))
    results = {"plan": asdict(plan), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "timings_s": timings, "speed": speed, "service_check": served,
               "configs": {d: {n: c["fields"] for n, c in t.items()} for d, t in speed_tables.items()},
               "analysis": analyse(plan, quality, speed),
               "outputs": {d: {n: [r["token_ids"] for r in runs] for n, runs in t.items()}
                           for d, t in quality.items()}}
    results["best_cascade"] = {d: best_cascade(a) for d, a in results["analysis"].items()}
    results["goals"] = goals(results)
    results["estimate_full_run_s"] = estimate_seconds(plan, timings, estimate_for or FrontierPlan())
    (out_dir / "frontier.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def goals(results: dict) -> dict:
    """Issue 17's goals: name -> (measured, goal, "≥", detail)."""
    out = {}
    for decoding in ("greedy", "sampled"):
        ratio, slowest = slowest_sd_end(results["speed"][decoding], "SPECULATIVE")
        out[f"{decoding}: slowest cascade at its SD end / SPECULATIVE"] = (ratio, 0.95, "≥", slowest)
    best = results["best_cascade"]["sampled"]
    out["sampled: fastest cascade within 1 % of TARGET / SPECULATIVE"] = (
        best["speed_vs_speculative"] if best else 0.0, 1.25, "≥",
        f"{best['name']} on {METRICS[best['metric']]}" if best else "none within 1 %")
    return out


def estimate_seconds(done: FrontierPlan, timings: dict, full: FrontierPlan) -> dict:
    """The full plan's time from this run's unit costs (per configuration × task)."""
    def units(p: FrontierPlan) -> dict[str, float]:
        n = sum(len(configs(p, s)) for s in (False, True))
        timed = sum(len(speed_configs(p, s)) for s in (False, True))
        seq = len(alphas(DeferralRule.CHOW, p.alphas_per_rule))
        check = n * p.service_check_tasks if p.quality_on == "engine" else 0
        return {"quality_s": n * p.tasks, "service_check_s": check,
                "speed_s": timed * p.speed_tasks * p.speed_rounds,
                "sequential_s": seq * (p.seq_tasks + p.speed_tasks) + p.speed_tasks,
                "score_s": p.tasks}
    have, want = units(done), units(full)
    parts = {k: timings[k] / have[k] * want[k] for k in have if have[k] and k in timings}
    return {**parts, "total_s": sum(parts.values())}
