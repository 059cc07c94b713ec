"""The frontier's statistics as pure functions of its measurements (bench/frontier.py runs them):
paired CIs against TARGET, the Pareto front, each rule against the truncation + SD baseline, the
knob, the goals, and the pilot's task-count sizing.

Rows (`analyse`): one per configuration, with its kind ("reference": TARGET, DRAFT, SPECULATIVE;
"cascade"; "lenience"; "truncation"; "sequential"), its group (the rule's name, or LENIENCE,
MIN_P, ETA) and its knob value (α, l, min_p or η) with that value's distance from the lossless end
(0 = SPECULATIVE's verification).

Pilot sizing. For paired per-task differences d_i = c_i − t_i (a configuration minus TARGET, the
same tasks and seeds), the 95 % CI of the mean difference has half-width z·s_d/√n (z = 1.96; the
paired bootstrap approaches it, tests/test_frontier.py), and the relative loss r = −d̄/|t̄| has
half-width z·s_d/(√n·|t̄|) (t̄ held fixed: its own variance adds a term in d̄², nil for a
configuration equal to TARGET). A half-width ≤ h therefore needs

    n ≥ (z · s_d / (h · |t̄|))².

With h = 0.5 %, a configuration equal to TARGET (r̂ ~ N(0, (h/z)²)) shows "loss ≤ 1 % at the upper
CI bound" with probability Φ(z) = 97.5 %. s_d for such a configuration is TARGET against itself with
other seeds (sampled; greedy repeats its outputs exactly); DRAFT's s_d bounds the configurations
between the two from above.
"""
from __future__ import annotations

import math
import statistics

from speccascade.bench.service import slowest_sd_end
from speccascade.models.evaluate import paired_bootstrap_ci
from speccascade.sampling import SD_END, DeferralRule

METRICS = {"target_loglik": "target log-likelihood (nats/token)",
           "edit_similarity": "code: edit similarity", "exact_match": "code: exact match",
           "fact_accuracy": "facts: correct answer"}
EXTERNAL = ("edit_similarity", "exact_match", "fact_accuracy")  # ground truth outside the models
MAX_LOSS = 0.01        # "within 1 % of TARGET": the upper CI bound of the relative loss
PILOT_HALF_WIDTH = 0.005
Z95 = 1.959963984540054
KNOB_GROUPS = [r.name for r in DeferralRule] + ["LENIENCE", "MIN_P", "ETA"]
KNOB_SYMBOL = {**{r.name: "α" for r in DeferralRule}, "LENIENCE": "l", "MIN_P": "min_p",
               "ETA": "η"}


def _mean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


def _values(runs: list[dict], metric: str) -> list[float]:
    return [r.get(metric, math.nan) for r in runs]


def _distance(row: dict) -> float:
    """How far a row's knob is from the lossless end (SPECULATIVE's verification)."""
    if row.get("distance") is not None:
        return row["distance"]
    return abs(row["alpha"] - SD_END[DeferralRule[row["rule"]]])


def _group(row: dict) -> str | None:
    return row.get("group") or row.get("rule")


def analyse(quality: dict, speed: dict, meta: dict) -> dict:
    """Per decoding: each configuration's means, paired CIs against TARGET, latency relative to
    TARGET, the metrics whose CI separates DRAFT from TARGET (and by how many half-widths), the
    Pareto front, each rule against the truncation + SD baseline, and the knob."""
    out = {}
    for decoding, table in quality.items():
        ref, sp = table["TARGET"], speed[decoding]
        target_tps, spec_tps = sp["TARGET"]["tokens_per_s"], sp["SPECULATIVE"]["tokens_per_s"]
        in_process = sp.get("TARGET (in process)", {}).get("tokens_per_s")
        rows = {}
        for name, runs in table.items():
            m = meta[decoding].get(name, {})
            tps = sp.get(name, {}).get("tokens_per_s", 0.0)
            sequential = m.get("kind") == "sequential"
            # The sequential cascade runs in process: its latency is against in-process TARGET.
            base = in_process if sequential else target_tps
            row = {"tasks": len(runs), "kind": m.get("kind", "reference"), "group": m.get("group"),
                   "value": m.get("value"), "distance": m.get("distance"), "rule": m.get("rule"),
                   "alpha": m.get("alpha"), "tokens_per_s": tps,
                   "latency_vs_target": base / tps if tps and base else math.inf,
                   "speed_vs_speculative": tps / spec_tps if not sequential and spec_tps else None,
                   "quality_ms_mean": statistics.fmean(r["ms"] for r in runs)}
            for metric in METRICS:
                row[metric] = _mean(_values(runs, metric))
                row[f"{metric}_ci"] = paired_bootstrap_ci(_values(runs, metric),
                                                          _values(ref[:len(runs)], metric))
            rows[name] = row
        draft = {m: rows["DRAFT"][f"{m}_ci"] for m in METRICS}
        separating = [m for m in METRICS if draft[m]["hi"] < 0]
        out[decoding] = {
            "rows": rows, "separating_metrics": separating,
            "separation": {m: abs(c["diff"]) / ((c["hi"] - c["lo"]) / 2) if c["hi"] > c["lo"]
                           else math.nan for m, c in draft.items()},
            "pareto": {m: pareto_front({n: (r["latency_vs_target"], r[m]) for n, r in rows.items()
                                        if math.isfinite(r["latency_vs_target"])
                                        and not math.isnan(r[m])}) for m in METRICS},
            "knob": {m: knob(rows, m) for m in separating},
            "versus_baseline": {m: versus_baseline(rows, table, m) for m in separating}}
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (latency, quality) that no other point beats: none is at least as
    fast and at least as good, and strictly better in one. Sorted by latency."""
    def beaten(a):
        xa, ya = points[a]
        return any(xb <= xa and yb >= ya and (xb < xa or yb > ya)
                   for b, (xb, yb) in points.items() if b != a)
    return sorted((n for n in points if not beaten(n)), key=lambda n: points[n])


def knob(rows: dict, metric: str) -> dict:
    """Per group (each rule, then the lenience and truncation baselines where measured): the
    most lenient measured value whose relative loss against TARGET, and that of every value
    between it and the lossless end, stays ≤ 1 % at the upper CI bound; None where none does."""
    out = {}
    for group in KNOB_GROUPS:
        measured = sorted((r for r in rows.values() if _group(r) == group
                           and r.get("kind", "cascade") != "sequential"
                           and r["speed_vs_speculative"] is not None), key=_distance)
        if not measured and group not in DeferralRule.__members__:
            continue  # a baseline this decoding does not measure (lenience, truncation: sampled)
        best = None
        for r in measured:
            if r[f"{metric}_ci"]["rel_loss_hi"] > MAX_LOSS:
                break
            best = r
        out[group] = None if best is None else {
            "value": best["value"] if best.get("value") is not None else best["alpha"],
            "alpha": best["alpha"], "rel_loss_hi": best[f"{metric}_ci"]["rel_loss_hi"],
            "latency_vs_target": best["latency_vs_target"],
            "speed_vs_speculative": best["speed_vs_speculative"]}
    return out


def versus_baseline(rows: dict, table: dict, metric: str) -> dict:
    """Per rule (and lenience): does it beat truncation sampling verified by SD at equal speed?
    The baseline configurations are the truncation ones and SPECULATIVE (truncation off). A
    configuration is beaten where some baseline runs at least as fast (latency ≤ its own) with at
    least its mean quality; otherwise it is "better" than the best baseline at ≥ its speed (with the
    paired CI of the difference), or "faster than every baseline". The rule beats the baseline where
    any of its configurations is not beaten."""
    baselines = [n for n, r in rows.items() if r["kind"] == "truncation" or n == "SPECULATIVE"]
    out = {}
    for group in [g for g in KNOB_GROUPS if g not in ("MIN_P", "ETA")]:
        members = sorted(((n, r) for n, r in rows.items() if _group(r) == group
                          and r["kind"] in ("cascade", "lenience")), key=lambda nr: _distance(nr[1]))
        if not members:
            continue
        verdicts = []
        for name, r in members:
            v = {"name": name, "value": r["value"] if r.get("value") is not None else r["alpha"],
                 "latency_vs_target": r["latency_vs_target"], "quality": r[metric]}
            as_fast = [b for b in baselines if rows[b]["latency_vs_target"] <= r["latency_vs_target"]]
            if not as_fast:
                v["verdict"] = "faster than every baseline"
            else:
                best = max(as_fast, key=lambda b: rows[b][metric])
                ci = paired_bootstrap_ci(_values(table[name], metric), _values(table[best], metric))
                v.update(baseline=best, ci=ci,
                         verdict="beaten" if rows[best][metric] >= r[metric] else "better")
            verdicts.append(v)
        out[group] = {"beats": any(v["verdict"] != "beaten" for v in verdicts),
                      "better_at_equal_speed": any(v["verdict"] == "better" for v in verdicts),
                      "configs": verdicts}
    return out


def _external_separating(analysis: dict) -> list[str]:
    return [m for m in analysis["separating_metrics"] if m in EXTERNAL]


def best_cascade(analysis: dict, metrics: list[str] | None = None) -> dict | None:
    """The fastest cascade (speed vs SPECULATIVE) whose relative loss against TARGET is ≤ 1 % at
    the upper CI bound on one of `metrics` (default: the external metrics whose CI separates DRAFT
    from TARGET); None if none is. The sequential cascade (timed in process) is not a candidate."""
    metrics = _external_separating(analysis) if metrics is None else metrics
    found = [{"name": name, "metric": m, "speed_vs_speculative": r["speed_vs_speculative"],
              "latency_vs_target": r["latency_vs_target"],
              "rel_loss_hi": r[f"{m}_ci"]["rel_loss_hi"]}
             for name, r in analysis["rows"].items() for m in metrics
             if r["rule"] and r.get("kind", "cascade") == "cascade"
             and r["speed_vs_speculative"] is not None and r[f"{m}_ci"]["rel_loss_hi"] <= MAX_LOSS]
    return max(found, key=lambda f: f["speed_vs_speculative"], default=None)


def fastest_within(analysis: dict, metrics: list[str] | None = None) -> dict | None:
    """The fastest configuration of any kind but TARGET (speed = 1 / latency vs TARGET) within
    1 % of TARGET at the upper CI bound on one of `metrics` (default as best_cascade)."""
    metrics = _external_separating(analysis) if metrics is None else metrics
    found = [{"name": name, "metric": m, "kind": r.get("kind"),
              "speed_vs_target": 1 / r["latency_vs_target"],
              "rel_loss_hi": r[f"{m}_ci"]["rel_loss_hi"]}
             for name, r in analysis["rows"].items() for m in metrics
             if name != "TARGET" and r["speed_vs_speculative"] is not None
             and r["latency_vs_target"] > 0 and r[f"{m}_ci"]["rel_loss_hi"] <= MAX_LOSS]
    return max(found, key=lambda f: f["speed_vs_target"], default=None)


def goals(results: dict) -> dict:
    """Issue 25's goals: name -> (measured, goal, "≥", detail)."""
    out = {}
    for decoding in ("greedy", "sampled"):
        ratio, slowest = slowest_sd_end(results["speed"][decoding], "SPECULATIVE")
        out[f"{decoding}: slowest cascade at its SD end / SPECULATIVE"] = (ratio, 0.95, "≥", slowest)
    a = results["analysis"]["sampled"]
    fast = fastest_within(a)
    note = {"reference": " (lossless SD: TARGET's distribution by construction)",
            "truncation": " (truncation + SD: lossless for its truncated target)"}
    out["sampled: fastest configuration within 1 % of TARGET / TARGET"] = (
        fast["speed_vs_target"] if fast else 0.0, 2.0, "≥",
        f"{fast['name']}{note.get(fast['kind'], '')} on {METRICS[fast['metric']]}" if fast
        else "none within 1 % on an external metric that separates DRAFT from TARGET")
    best = best_cascade(a)
    front = best is not None and best["name"] in a["pareto"][best["metric"]]
    out["sampled: fastest cascade within 1 % of TARGET / SPECULATIVE"] = (
        best["speed_vs_speculative"] if best else 0.0, 1.25, "≥",
        f"{best['name']} on {METRICS[best['metric']]}; on the Pareto front against lenience and "
        f"truncation + SD: {'yes' if front else 'no'}" if best else "none within 1 %")
    return out


# --------------------------------------------------------------------------------------------
# Pilot sizing (module docstring): tasks needed for a 0.5 % half-width of the relative loss.
# --------------------------------------------------------------------------------------------

def tasks_for_half_width(diffs, reference_mean: float, half_width: float = PILOT_HALF_WIDTH,
                         z: float = Z95) -> int | None:
    """n ≥ (z·s_d / (h·|t̄|))²: the tasks for which the relative loss's CI half-width is ≤ h,
    from a pilot's per-task differences (NaN left out). None where it cannot be sized: fewer than
    two differences, no TARGET mean, or no spread at all (a rare binary metric whose few hits
    agreed in the pilot says nothing about the spread of a larger set)."""
    d = [x for x in diffs if not math.isnan(x)]
    if len(d) < 2 or not reference_mean or math.isnan(reference_mean):
        return None
    s = statistics.stdev(d)
    return max(1, math.ceil((z * s / (half_width * abs(reference_mean))) ** 2)) if s > 0 else None


def relative_half_width(diffs, reference_mean: float, n: int, z: float = Z95) -> float:
    """The relative loss's CI half-width z·s_d/(√n·|t̄|) that n tasks would give."""
    d = [x for x in diffs if not math.isnan(x)]
    if len(d) < 2 or not reference_mean or n < 1:
        return math.nan
    return z * statistics.stdev(d) / (math.sqrt(n) * abs(reference_mean))


def pilot_sizing(quality: dict, plan_tasks: int, half_width: float = PILOT_HALF_WIDTH) -> dict:
    """quality: {decoding: {"TARGET": runs, "DRAFT": runs, ["TARGET reseeded": runs]}} scored on the
    same tasks; plan_tasks: the full plan's tasks (both families). Per decoding and metric: TARGET's
    mean, and per comparison the mean difference, s_d, the tasks needed for the half-width, and
    the half-width and separation (|d̄| in half-widths) the full plan's tasks would give (a metric
    defined on one family gets its share of them). "needed": the reseeded comparison's count
    where there is one (a configuration equal to TARGET), else DRAFT's (an upper bound)."""
    out = {}
    for decoding, table in quality.items():
        ref = table["TARGET"]
        per = {}
        for metric in METRICS:
            t = _values(ref, metric)
            mean_t = _mean(t)
            entry = {"target_mean": mean_t, "comparisons": {}}
            for name, runs in table.items():
                if name == "TARGET":
                    continue
                d = [c - r for c, r in zip(_values(runs, metric), t)
                     if not (math.isnan(c) or math.isnan(r))]
                if len(d) < 2:
                    continue
                n_plan = round(plan_tasks * len(d) / len(ref))
                hw = relative_half_width(d, mean_t, n_plan)
                diff = statistics.fmean(d)
                entry["comparisons"][name] = {
                    "tasks": len(d), "diff": diff, "sd": statistics.stdev(d),
                    "tasks_needed": tasks_for_half_width(d, mean_t, half_width),
                    "plan_tasks": n_plan, "rel_half_width_at_plan": hw,
                    "separation_at_plan": abs(diff / mean_t) / hw
                    if math.isfinite(hw) and hw > 0 else math.nan}
            comps = entry["comparisons"]
            chosen = comps.get("TARGET reseeded") or comps.get("DRAFT")
            entry["needed"] = chosen["tasks_needed"] if chosen else None
            entry["needed_from"] = "TARGET reseeded" if "TARGET reseeded" in comps else "DRAFT"
            entry["plan_tasks"] = chosen["plan_tasks"] if chosen else None
            per[metric] = entry
        out[decoding] = per
    return out


def primary_metric(analysis: dict) -> tuple[str | None, bool]:
    """(the metric the knob is read on, whether it has external ground truth): of the metrics
    whose CI separates DRAFT from TARGET, the external one furthest apart in half-widths, else
    the one furthest apart; (None, False) if none separates."""
    sep = analysis["separating_metrics"]
    by = lambda m: analysis["separation"].get(m, 0.0)  # noqa: E731
    external = [m for m in sep if m in EXTERNAL]
    if external:
        return max(external, key=by), True
    return (max(sep, key=by), False) if sep else (None, False)
