"""Speculation control under load: tokens/s against concurrent streams, greedy and sampled.

At each stream count every configuration — TARGET, fixed γ and the speculation controller (γ
unset) — runs the same prompts, interleaved: repeat r runs them all in a rotated order, so a machine
whose speed drifts slows them alike. A cell's speed is its tokens over its wall time, summed over
the repeats; its mean batch is the replicas' rows per engine forward over the cell. Greedy cells at
one stream keep their token ids, for the losslessness check against TARGET.
"""
from __future__ import annotations

import os
import time

import grpc

from tqdm import tqdm

from speccascade.bench.measure import cpu_ms_per_round, cpu_seconds_by_process, run_concurrent, summarize
from speccascade.bench.service import SAMPLED, batch_counters

CONTROLLER = "controller (γ unset)"


def configs(gammas: tuple[int, ...], sampled: bool) -> dict[str, dict]:
    extra = SAMPLED if sampled else {}
    out = {"TARGET": dict(mode="target", **extra)}
    for gamma in gammas:
        out[f"γ={gamma}"] = dict(mode="speculative", num_draft_tokens=gamma, **extra)
    out[CONTROLLER] = dict(mode="speculative", **extra)
    return out


def _cell(runs, wall: float, cpu: dict, batches: dict, keep_ids: bool = False) -> dict:
    summary = summarize(runs)
    if keep_ids:
        summary["token_ids"] = [r.token_ids for r in runs]
    summary["aggregate_tokens_per_s"] = summary["tokens"] / wall if wall else 0.0
    summary["wall_s"] = wall
    summary["mean_batch_size"] = {role: calls / max(1, n) for role, (n, calls) in batches.items()}
    rounds = sum(r.stats.get("rounds", 0) for r in runs)
    summary["cpu_ms_per_round"] = cpu_ms_per_round({}, cpu, rounds)
    summary["cpu_busy_fraction"] = sum(cpu.values()) / (wall * (os.cpu_count() or 1)) if wall else 0.0
    histogram: list[int] = []
    for r in runs:
        for gamma, count in enumerate(r.stats.get("num_draft_tokens_histogram", [])):
            histogram.extend([0] * (gamma + 1 - len(histogram)))
            histogram[gamma] += count
    summary["gamma_histogram"] = histogram
    summary["mean_gamma"] = (sum(g * c for g, c in enumerate(histogram)) / sum(histogram)
                             if sum(histogram) else 0.0)
    return summary


def cell(table: dict, name: str, streams: int) -> dict:
    """A configuration's summary at a stream count (int keys in memory, str after JSON)."""
    cells = table[name]
    return cells.get(streams) or cells[str(streams)]


def _measure(client, batch: list, streams: int, plan, fields: dict, acc: dict) -> None:
    """One cell and repeat: the runs, their wall time, CPU by process and batch counters, added
    to `acc`."""
    for attempt in range(3):  # a replica or Serve's controller replaced mid-cell: measure again
        try:
            cpu_before, counters_before = cpu_seconds_by_process(), batch_counters(client)
            runs, wall = run_concurrent(client, batch, streams, max_new_tokens=plan.new_tokens,
                                        **fields)
            cpu_after, counters_after = cpu_seconds_by_process(), batch_counters(client)
            break
        except grpc.RpcError as exc:
            if attempt == 2 or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            print(f"cell ({streams} streams, {fields}) failed: {exc.details()}; measuring it again")
            time.sleep(15)
    acc["runs"] += runs
    acc["wall"] += wall
    for process, seconds in cpu_after.items():
        acc["cpu"][process] = acc["cpu"].get(process, 0.0) + seconds - cpu_before.get(process, 0.0)
    for role, (batches, calls) in counters_after.items():
        b0, c0 = counters_before.get(role, (0, 0))
        nb, nc = acc["batches"].get(role, (0, 0))
        acc["batches"][role] = (nb + batches - b0, nc + calls - c0)


def measure(client, plan, prompts, table: dict[str, dict], streams_levels, repeats: int,
            bar=None) -> dict:
    """{configuration: {streams: summary}} for one table of configurations."""
    out: dict = {name: {} for name in table}
    for streams in streams_levels:
        batch = [prompts[i % len(prompts)] for i in range(max(streams, plan.sweep_min_requests))]
        acc = {name: {"runs": [], "wall": 0.0, "cpu": {}, "batches": {}} for name in table}
        names = list(table)
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                _measure(client, batch, streams, plan, table[name], acc[name])
                if bar is not None:
                    bar.update()
        for name, a in acc.items():
            keep = streams == 1 and "temperature" not in table[name]
            out[name][streams] = _cell(a["runs"], a["wall"], a["cpu"], a["batches"], keep)
    return out


def run(client, plan, prompts) -> dict:
    """{"greedy" | "sampled": {configuration: {streams: summary}}}."""
    kinds = {"greedy": configs(plan.sweep_gammas, False), "sampled": configs(plan.sweep_gammas, True)}
    total = sum(len(c) for c in kinds.values()) * len(plan.sweep_streams) * plan.sweep_repeats
    with tqdm(total=total, desc="service: speculation control sweep", unit="cell") as bar:
        return {kind: measure(client, plan, prompts, table, plan.sweep_streams,
                              plan.sweep_repeats, bar)
                for kind, table in kinds.items()}


def goals(sweep: dict) -> dict[str, tuple[float, float, str, int]]:
    """The controller against the best fixed γ of each level, chosen in hindsight (issue 23), and
    against TARGET (issue 16), at its worst stream count."""
    out = {}
    for kind, table in sweep.items():
        levels = sorted({int(s) for s in table[CONTROLLER]})
        ratios_fixed, ratios_target = [], []
        for streams in levels:
            def tps(name):
                return cell(table, name, streams)["aggregate_tokens_per_s"]
            best = max(tps(name) for name in table if name.startswith("γ="))
            ratios_fixed.append(tps(CONTROLLER) / best)
            ratios_target.append(tps(CONTROLLER) / tps("TARGET"))
        out[f"{kind}: controller / best fixed γ, worst stream count"] = (min(ratios_fixed), 0.97, "≥", 23)
        out[f"{kind}: controller / TARGET, worst stream count"] = (min(ratios_target), 1.0, "≥", 16)
    return out
