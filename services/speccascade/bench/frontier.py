"""`speccascade bench frontier`: the quality–latency frontier of speculative cascades against the
lossy baselines, with CIs (statistics in bench/frontier_stats.py, the report in frontier_report.py).

Configurations, greedy and sampled (T 0.8, top_p 0.95), every one on the same tasks with the same
per-task seeds: TARGET, DRAFT, SPECULATIVE, the six rules over their α range; sampled only (both
are no-ops at temperature 0): lossy SD with lenience l (accept with min(1, p/(l·q))) and
truncation + SD, min-p or η-sampling of the target verified losslessly (Fast-HSD's baseline). A
truncation configuration samples exactly its truncated target p̃ in TARGET and in SPECULATIVE
mode, so its quality is measured in TARGET mode (cheaper in process) and its speed in SPECULATIVE
mode: one row, two measurements of the same distribution. The sequential cascade (Chow, greedy)
runs in process.

Tasks (bench/workload.py), two families with external ground truth, interleaved:

- code: held-out stdlib line completion, exact match and edit similarity of the next line;
- facts: short questions through the chat template (capitals, antonyms, irregular plurals),
  whether the reply's first line holds a known answer;

and, on both, the target's mean log-likelihood per token of the continuation up to the end of that
line (fp32, scored afterwards in process). Each stream stops once its line is complete: later
tokens cannot change any metric. Every metric is compared with TARGET of the same decoding by a
paired bootstrap 95 % CI.

Where quality runs (`quality_on`): through the gRPC service the verifier serializes its calls, so
by default the quality pass runs the same loop, front-door validation, workers and sampler in
process with `chunk` tasks sharing each forward, and the first `service_check_tasks` tasks of
every configuration also go through the service, which must give the same outputs (reported).

Speed, through the service: latency relative to TARGET is 1 / (tokens/s relative to TARGET) of a
single-stream pass over a fixed subset of tasks at full length, interleaved over the
configurations `speed_rounds` times. Every rule at its SD end is timed too: its rounds do
SPECULATIVE's verification and should cost the same.

`--pilot` (run_pilot) sizes the task set first: TARGET against DRAFT and against itself with other
seeds on a small sample, and per metric the tasks a 0.5 % CI half-width of the relative loss needs.
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from speccascade.bench.frontier_stats import (analyse, best_cascade, goals, pilot_sizing)
from speccascade.bench.measure import stream_one, summarize
from speccascade.bench.run import alpha_sweep
from speccascade.bench.service import SAMPLED, sd_end_cascades
from speccascade.bench.workload import FAMILIES, Task, frontier_tasks
from speccascade.models.evaluate import (FACT_TOKENS, LINE_TOKENS, answer_correct,
                                         continuation_log_likelihoods, edit_similarity,
                                         exact_match, line_complete, line_token_count,
                                         predicted_line, reply_complete, reply_line,
                                         reply_token_count)
from speccascade.sampling import SD_END, DeferralRule

# Per family: tokens to generate, when the scored line is complete, and its length in tokens.
MAX_TOKENS = {"code": LINE_TOKENS, "facts": FACT_TOKENS}
COMPLETE = {"code": line_complete, "facts": reply_complete}
CUT = {"code": line_token_count, "facts": reply_token_count}
RESEED = 1_000_003  # the pilot's "TARGET reseeded": task i samples with seed + RESEED + i


@dataclass(frozen=True)
class FrontierPlan:
    # Sized to about an hour on a 2-core CPU host with the real pair (README, "Quality–latency
    # frontier"); the pilot (--pilot) says what a given CI half-width needs.
    tasks: int = 50               # per family (bench/workload.py), interleaved
    families: tuple[str, ...] = FAMILIES
    alphas_per_rule: int = 2      # α values strictly between the SD end and the draft end
    lenience: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)    # lossy SD, sampled only
    min_p: tuple[float, ...] = (0.05, 0.1, 0.2)           # truncation + SD, sampled only
    eta: tuple[float, ...] = (0.002, 0.01, 0.04)
    quality_on: str = "engine"    # "engine": in process, batched; "service": through gRPC
    chunk: int = 200              # in-process tasks started together (their prefills batch)
    service_check_tasks: int = 8   # quality_on "engine": these first tasks also via the service
    streams: int = 8              # concurrent quality streams through the service
    speed_tasks: int = 4          # single-stream speed subset (the first tasks: both families)
    speed_rounds: int = 2
    seq_tasks: int = 20           # the in-process sequential cascade (one token per Python step)
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
        return cls(**{**dict(tasks=4, alphas_per_rule=1, lenience=(0.5,), min_p=(0.1,),
                             eta=(0.01,), chunk=4, service_check_tasks=4, streams=4,
                             speed_tasks=2, speed_rounds=1, seq_tasks=2), **kw})

    def sample(self) -> "FrontierPlan":
        """--estimate-only: the same kinds of work, few tasks and one value per grid."""
        return replace(self, tasks=min(self.tasks, max(self.streams, 48)), alphas_per_rule=1,
                       lenience=self.lenience[:1], min_p=self.min_p[:1], eta=self.eta[:1],
                       speed_tasks=2, speed_rounds=1, seq_tasks=2,
                       service_check_tasks=min(self.service_check_tasks, 4))


def alphas(rule: DeferralRule, count: int) -> list[float]:
    """count α values of the bench's grid, without its SD end (SPECULATIVE measures that)."""
    return alpha_sweep(rule, count + 1)[1:]


def _sampled_fields(sampled: bool) -> dict:
    """The sampled decoding's fields; the seed is per task (`seeded`)."""
    return {k: v for k, v in SAMPLED.items() if k != "seed"} if sampled else {}


def _config(fields: dict, kind: str, group: str | None = None, value: float | None = None,
            distance: float | None = None, **extra) -> dict:
    return {"fields": fields, "kind": kind, "group": group, "value": value,
            "distance": distance, **extra}


def configs(plan: FrontierPlan, sampled: bool) -> dict[str, dict]:
    """name -> {"fields": the quality pass's request fields, ["speed_fields": the speed pass's,
    where they differ], "kind", "group", "value", "distance" (from the lossless end)}."""
    extra = _sampled_fields(sampled)
    target = dict(mode="target", **extra)
    spec = dict(mode="speculative", num_draft_tokens=plan.gamma, **extra)
    out = {"TARGET": _config(target, "reference"),
           "DRAFT": _config(dict(mode="draft", **extra), "reference"),
           "SPECULATIVE": _config(spec, "reference", distance=0.0)}
    for rule in DeferralRule:
        for alpha in alphas(rule, plan.alphas_per_rule):
            out[f"{rule.name} α={alpha:g}"] = _config(
                dict(mode="cascade", deferral_rule=rule.name, deferral_threshold=alpha,
                     num_draft_tokens=plan.gamma, **extra),
                "cascade", rule.name, alpha, abs(alpha - SD_END[rule]), rule=rule.name, alpha=alpha)
    if sampled:  # at temperature 0 lenience and truncation change nothing
        for lenience in plan.lenience:
            out[f"LENIENT SD l={lenience:g}"] = _config({**spec, "lenience": lenience}, "lenience",
                                                        "LENIENCE", lenience, 1 - lenience)
        for group, field, symbol, grid in (("MIN_P", "min_p", "min_p", plan.min_p),
                                           ("ETA", "eta", "η", plan.eta)):
            for v in grid:  # quality in TARGET mode, speed in SPECULATIVE: the same p̃
                out[f"SD {symbol}={v:g}"] = _config({**target, field: v}, "truncation", group, v, v,
                                                    speed_fields={**spec, field: v})
    return out


def speed_configs(plan: FrontierPlan, sampled: bool) -> dict[str, dict]:
    """The quality configurations (with their speed fields) plus every rule at its SD end."""
    extra = _sampled_fields(sampled)
    out = {name: {**c, "fields": c.get("speed_fields", c["fields"])}
           for name, c in configs(plan, sampled).items()}
    for name, fields in sd_end_cascades(plan.gamma, **extra).items():
        rule = fields["deferral_rule"]
        out[name] = _config(fields, "sd_end", rule, fields["deferral_threshold"], 0.0, rule=rule,
                            alpha=fields["deferral_threshold"], sd_end=True)
    return out


def pilot_configs(plan: FrontierPlan) -> dict[str, dict[str, dict]]:
    """--pilot: TARGET and DRAFT, greedy and sampled, and sampled TARGET with other seeds."""
    out = {d: {n: c for n, c in configs(plan, d == "sampled").items() if n in ("TARGET", "DRAFT")}
           for d in ("greedy", "sampled")}
    out["sampled"]["TARGET reseeded"] = {**out["sampled"]["TARGET"], "seed_offset": RESEED}
    return out


def seeded(config: dict, plan: FrontierPlan, task: int) -> dict:
    fields = config["fields"]
    return {**fields, "seed": plan.seed + config.get("seed_offset", 0) + task} \
        if fields.get("temperature") else fields


def _answer(task: Task, text: str) -> str:
    return predicted_line(text) if task.family == "code" else reply_line(text)


def complete_line(client, task: Task, cancel: bool = True, **fields) -> dict:
    """Stream until the task's scored line is complete, then cancel the rest of the stream (or,
    with cancel=False, read it to its end: the metrics only look at the tokens up to the line's
    end)."""
    started = time.perf_counter()
    ids, text = [], ""
    stream = client.generate_stream(task.prompt, max_new_tokens=MAX_TOKENS[task.family], **fields)
    for message in stream:
        ids.extend(message.token_ids)
        text += message.text
        if cancel and COMPLETE[task.family](text):
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
            run = complete_line(client, tasks[i], plan.stop_at_line_end,
                                **seeded(table[name], plan, i))
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
        task = tasks[i]
        request = to_generation_request(
            make_request(task.prompt, max_new_tokens=MAX_TOKENS[task.family],
                         **seeded(table[name], plan, i)),
            request_id=f"{name}/{i}", tokenizer=engine.tokenizer, limits=limits)
        started = time.perf_counter()
        ids, text = [], ""
        stream = generate(request, engine.drafter, engine.verifier, engine.tokenizer,
                          engine.controller)
        try:
            async for delta in stream:
                ids.extend(delta.token_ids)
                text += delta.text
                if plan.stop_at_line_end and COMPLETE[task.family](text):
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


def service_agreement(tasks, engine_runs: dict, service_runs: dict) -> dict:
    """How far the service's outputs for the same tasks and seeds match the in-process ones."""
    out = {}
    for name, served in service_runs.items():
        here = engine_runs[name][:len(served)]
        out[name] = {"tasks": len(served),
                     "identical": sum(a["token_ids"] == b["token_ids"] for a, b in zip(here, served)),
                     "same_line": sum(_answer(t, a["text"]) == _answer(t, b["text"])
                                      for t, a, b in zip(tasks, here, served))}
    return out


def speed_pass(client, plan, tasks, table: dict, desc: str) -> dict[str, dict]:
    """Single stream, full length, configurations interleaved in each of plan.speed_rounds."""
    runs: dict[str, list] = {name: [] for name in table}
    subset = tasks[:plan.speed_tasks]
    with tqdm(total=plan.speed_rounds * len(table) * len(subset), desc=desc, unit="req") as bar:
        for _ in range(plan.speed_rounds):
            for name, config in table.items():
                for i, task in enumerate(subset):
                    runs[name].append(stream_one(client, task.prompt,
                                                 max_new_tokens=MAX_TOKENS[task.family],
                                                 **seeded(config, plan, i)))
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
    subset = tasks[:plan.speed_tasks]
    runs, speed = {}, {}
    tokens = seconds = 0.0
    for task in subset:  # per task: each family has its own length
        r = engine_generate(engine, [engine.encode(task.prompt)], MAX_TOKENS[task.family],
                            mode=Mode.TARGET)
        tokens, seconds = tokens + r["tokens"], seconds + r["tokens"] / r["tokens_per_s"]
    speed["TARGET (in process)"] = {"tokens_per_s": tokens / seconds if seconds else 0.0}
    with tqdm(total=len(grid) * (plan.seq_tasks + len(subset)), desc="sequential cascade",
              unit="task") as bar:
        def one(task):
            bar.update()
            return sequential_cascade(target, draft, engine.tokenizer, engine.encode(task.prompt),
                                      alpha=alpha, max_new_tokens=MAX_TOKENS[task.family])
        for alpha in grid:
            name = f"SEQUENTIAL CHOW α={alpha:g}"
            runs[name] = [{"token_ids": r["token_ids"], "text": r["text"], "ms": r["total_ms"]}
                          for r in map(one, tasks[:plan.seq_tasks])]
            timed = [one(task) for task in subset]
            tokens, seconds = sum(len(r["token_ids"]) for r in timed), sum(r["total_ms"] for r in timed)
            speed[name] = {"tokens_per_s": tokens / (seconds / 1000) if seconds else 0.0}
    return runs, speed


def _metrics(task: Task, text: str) -> dict[str, float]:
    """The external metrics of one output; NaN where the metric is another family's."""
    if task.family == "code":
        pred = predicted_line(text)
        return {"exact_match": exact_match(pred, task.answers[0]),
                "edit_similarity": edit_similarity(pred, task.answers[0]),
                "fact_accuracy": math.nan}
    return {"exact_match": math.nan, "edit_similarity": math.nan,
            "fact_accuracy": answer_correct(reply_line(text), task.answers)}


def score(engine, tasks, decodings: dict[str, dict[str, list[dict]]]) -> None:
    """Adds per-task metrics to every run in place; the log-likelihood over the line's tokens."""
    target = engine.verifier.worker.runner.model
    tok = engine.tokenizer
    for runs in (r for table in decodings.values() for r in table.values()):
        for task, run in zip(tasks, runs):
            run.update(_metrics(task, run["text"]))
            run["line_ids"] = run["token_ids"][:CUT[task.family](tok, run["token_ids"])]
    for i, task in enumerate(tqdm(tasks, desc="target log-likelihood", unit="task")):
        here = [runs[i] for table in decodings.values() for runs in table.values() if i < len(runs)]
        for run, value in zip(here, continuation_log_likelihoods(
                target, engine.encode(task.prompt), [r["line_ids"] for r in here])):
            run["target_loglik"] = value


def _engines(plan: FrontierPlan):
    """(the fp32 engine that scores and runs the sequential cascade, a loader of the batched
    in-process engine in the replicas' dtype)."""
    from speccascade.engine.engine import Engine

    paths = dict(target_path=plan.target, draft_path=plan.draft) if plan.target and plan.draft else {}
    # KV slots sized to line completion (prompt + line), not the model context: 64 slots of 2048
    # fp32 positions of the 135 M target alone are 6 GB.
    kv = dict(max_live_seqs=8, max_seq_len=FRONTIER_CONTEXT)
    engine = (Engine.from_paths(**paths, dtype="float32", **kv) if paths
              else Engine.default(dtype="float32", **kv))

    def batched():
        kw = dict(dtype=plan.dtype or "auto", max_live_seqs=max(8, plan.chunk),
                  max_seq_len=FRONTIER_CONTEXT)
        return Engine.from_paths(**paths, **kw) if paths else Engine.default(**kw)
    return engine, batched


def run_frontier(plan: FrontierPlan, out_dir: Path, *, estimate_for: FrontierPlan | None = None) -> dict:
    """The timed work first, on a quiet machine (service check, speed, sequential cascade), then the
    in-process quality pass and the scoring, which time nothing. The raw measurements are written
    to frontier_raw.json before the analysis."""
    import torch

    from speccascade.client import SpecCascadeClient
    from speccascade.serve import launch

    if plan.quality_on not in ("engine", "service"):
        raise ValueError(f"quality_on must be 'engine' or 'service', got {plan.quality_on!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    engine, batched_engine = _engines(plan)
    tasks = frontier_tasks(engine.tokenizer, plan.tasks, plan.families)
    tables = {"greedy": configs(plan, False), "sampled": configs(plan, True)}
    speed_tables = {"greedy": speed_configs(plan, False), "sampled": speed_configs(plan, True)}
    quality, speed, checked = {}, {}, {}
    torch.set_num_threads(1)  # in-process speed as one replica runs
    address = launch.start(_service_config(plan))
    try:
        with SpecCascadeClient(address) as client:
            client.generate(tasks[0].prompt, max_new_tokens=4)  # warm up every deployment
            timings["startup_s"] = time.perf_counter() - started
            started = time.perf_counter()
            if plan.quality_on == "service":
                for decoding, table in tables.items():
                    quality[decoding] = quality_pass(client, plan, tasks, table,
                                                     f"quality: {decoding}")
                timings["quality_s"] = time.perf_counter() - started
            else:
                check = tasks[:plan.service_check_tasks]
                for decoding, table in tables.items():
                    checked[decoding] = quality_pass(client, plan, check, table,
                                                     f"service check: {decoding}")
                timings["service_check_s"] = time.perf_counter() - started
            started = time.perf_counter()
            for decoding, table in speed_tables.items():
                speed[decoding] = speed_pass(client, plan, tasks, table, f"speed: {decoding}")
            timings["speed_s"] = time.perf_counter() - started
    finally:
        launch.stop()
    started = time.perf_counter()
    seq_runs, seq_speed = sequential_runs(engine, plan, tasks)
    speed["greedy"].update(seq_speed)
    timings["sequential_s"] = time.perf_counter() - started
    served = {}
    if plan.quality_on == "engine":
        # The replicas' dtype ("auto" as the service resolves it), every core.
        torch.set_num_threads(os.cpu_count() or 1)
        started = time.perf_counter()
        batched = batched_engine()
        timings["startup_s"] += time.perf_counter() - started
        started = time.perf_counter()
        for decoding, table in tables.items():
            quality[decoding] = engine_quality_pass(batched, plan, tasks, table,
                                                    f"quality (in process): {decoding}")
            served[decoding] = service_agreement(tasks[:plan.service_check_tasks],
                                                 quality[decoding], checked[decoding])
        timings["quality_s"] = time.perf_counter() - started
        del batched
        torch.set_num_threads(1)
    quality["greedy"].update(seq_runs)
    (out_dir / "frontier_raw.json").write_text(json.dumps(
        {"plan": asdict(plan), "quality": quality, "speed": speed, "service_check": served,
         "timings_s": timings}, default=str))
    started = time.perf_counter()
    score(engine, tasks, quality)
    timings["score_s"] = time.perf_counter() - started
    meta = {d: {n: {k: c.get(k) for k in ("kind", "group", "value", "distance", "rule", "alpha")}
                for n, c in t.items()} for d, t in speed_tables.items()}
    for name in seq_runs:
        alpha = float(name.split("=")[1])
        meta["greedy"][name] = {"kind": "sequential", "group": "SEQUENTIAL CHOW", "value": alpha,
                                "distance": alpha, "rule": "CHOW", "alpha": alpha}
    for decoding, table in speed_tables.items():
        for name, config in table.items():
            speed[decoding][name].update(rule=config.get("rule"), alpha=config.get("alpha"),
                                         sd_end=config.get("sd_end", False))
    results = {"plan": asdict(plan), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "tasks": {"families": list(plan.families), "per_family": plan.tasks,
                         "facts_kinds": sorted({t.kind for t in tasks if t.family == "facts"})},
               "timings_s": timings, "speed": speed, "service_check": served, "meta": meta,
               "configs": {d: {n: {"quality": c["fields"],
                                   "speed": c.get("speed_fields", c["fields"])}
                               for n, c in tables[d].items()} for d in tables},
               "analysis": analyse(quality, speed, meta),
               "outputs": {d: {n: [r["token_ids"] for r in runs] for n, runs in t.items()}
                           for d, t in quality.items()}}
    results["best_cascade"] = {d: best_cascade(a) for d, a in results["analysis"].items()}
    results["goals"] = goals(results)
    results["estimate_full_run_s"] = estimate_seconds(plan, timings, estimate_for or FrontierPlan())
    (out_dir / "frontier.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def run_pilot(plan: FrontierPlan, out_dir: Path, full: FrontierPlan) -> dict:
    """TARGET against DRAFT, and sampled TARGET against itself with other seeds, in process on
    plan.tasks tasks per family; per metric, the tasks the full plan needs (frontier_stats)."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    engine, batched_engine = _engines(plan)
    tasks = frontier_tasks(engine.tokenizer, plan.tasks, plan.families)
    torch.set_num_threads(os.cpu_count() or 1)
    batched = batched_engine()
    quality = {d: engine_quality_pass(batched, plan, tasks, t, f"pilot: {d}")
               for d, t in pilot_configs(plan).items()}
    del batched
    torch.set_num_threads(1)
    score(engine, tasks, quality)
    results = {"plan": asdict(plan), "full_plan_tasks": full.tasks * len(full.families),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "seconds": time.perf_counter() - started,
               "sizing": pilot_sizing(quality, full.tasks * len(full.families))}
    (out_dir / "pilot.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def estimate_seconds(done: FrontierPlan, timings: dict, full: FrontierPlan) -> dict:
    """The full plan's time from this run's unit costs: configurations × tasks (quality, service
    check), × requests (speed), per sequential-cascade task; scoring per task × (8 + configs), a
    prompt forward costing about as much as 8 outputs; start-up once."""
    def units(p: FrontierPlan) -> dict[str, float]:
        n = sum(len(configs(p, s)) for s in (False, True))
        timed = sum(len(speed_configs(p, s)) for s in (False, True))
        tasks = p.tasks * len(p.families)
        seq = len(alphas(DeferralRule.CHOW, p.alphas_per_rule))
        check = n * min(p.service_check_tasks, tasks) if p.quality_on == "engine" else 0
        return {"startup_s": 1, "quality_s": n * tasks, "service_check_s": check,
                "speed_s": timed * p.speed_tasks * p.speed_rounds,
                "sequential_s": seq * (p.seq_tasks + p.speed_tasks) + p.speed_tasks,
                "score_s": tasks * (8 + n + seq)}
    have, want = units(done), units(full)
    parts = {k: timings[k] / have[k] * want[k] for k in have if have[k] and k in timings}
    return {**parts, "total_s": sum(parts.values())}
