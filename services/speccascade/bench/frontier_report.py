"""The "Quality–latency frontier" markdown section, its PNG plots, the README's "Choosing α" table
(choosing_alpha.md) and the pilot's sizing table, from frontier.json's and pilot.json's dicts."""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from speccascade.bench.frontier_stats import (EXTERNAL, KNOB_GROUPS, KNOB_SYMBOL,  # noqa: E402
                                              MAX_LOSS, METRICS, PILOT_HALF_WIDTH, best_cascade,
                                              primary_metric)

COMMAND = "make frontier   # = speccascade bench frontier --out benchmarks --markdown benchmarks/frontier.md"
TITLES = {"greedy": "greedy", "sampled": "sampled (T 0.8, top_p 0.95)"}
README_BEGIN, README_END = "<!-- choosing-alpha:begin -->", "<!-- choosing-alpha:end -->"
BASELINE_STYLE = {"LENIENCE": ("^--", "lossy SD (lenience l)"),
                  "MIN_P": ("D--", "min-p + SD"), "ETA": ("P--", "η-sampling + SD")}


def _ci(ci: dict, digits: int = 3) -> str:
    if math.isnan(ci["diff"]):
        return "–"
    return f"{ci['diff']:+.{digits}f} [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"


def _speed(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}×"


def plot(analysis: dict, decoding: str, path: Path) -> None:
    """Quality against latency relative to TARGET, one panel per metric. Error bars: TARGET's mean
    plus the paired 95 % CI of the difference (the comparison the CIs are for). Ringed: the
    Pareto front over every configuration, rules and baselines alike."""
    rows = analysis["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    for ax, (metric, label) in zip(axes.flat, METRICS.items()):
        base = rows["TARGET"][metric]
        if math.isnan(base):
            ax.set_visible(False)
            continue

        def point(r):
            ci = r[f"{metric}_ci"]
            return r["latency_vs_target"], base + ci["diff"], (ci["diff"] - ci["lo"], ci["hi"] - ci["diff"])

        def line(members, fmt=None, **kw):
            members = sorted(members, key=lambda r: r["latency_vs_target"])
            if members:
                xs, ys, errs = zip(*map(point, members))
                ax.errorbar(xs, ys, yerr=[[e[0] for e in errs], [e[1] for e in errs]], fmt=fmt,
                            capsize=3, **kw)

        groups: dict[str, list] = {}
        for r in rows.values():
            if r["kind"] in ("cascade", "lenience", "truncation") and math.isfinite(r["latency_vs_target"]):
                groups.setdefault(r["group"], []).append(r)
        for group, members in groups.items():
            fmt, name = BASELINE_STYLE.get(group, ("o-", group))
            line(members, fmt, label=name, **({"color": "grey"} if group in BASELINE_STYLE else {}))
        line([r for r in rows.values() if r["kind"] == "sequential"], "k--x",
             label="sequential cascade (Chow, in process)")
        for name, marker in (("SPECULATIVE", "*"), ("TARGET", "s"), ("DRAFT", "v")):
            x, y, err = point(rows[name])
            ax.errorbar([x], [y], yerr=[[err[0]], [err[1]]], fmt=marker, markersize=12,
                        color="black", label=name)
        front = [rows[n] for n in analysis["pareto"][metric]]
        ax.plot([r["latency_vs_target"] for r in front], [r[metric] for r in front], "o:",
                color="grey", markersize=16, markerfacecolor="none", label="Pareto front")
        ax.set_xlabel("latency relative to TARGET (lower is faster)")
        ax.set_ylabel(label + ("" if metric in EXTERNAL else " (not external)"))
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Quality–latency frontier, {TITLES[decoding]}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _value(group: str, v) -> str:
    return f"{KNOB_SYMBOL.get(group, 'α')} = {v:g}"


def knob_table(analysis: dict, decoding: str) -> list[str]:
    lines = []
    for metric, per_group in analysis["knob"].items():
        external = "" if metric in EXTERNAL else " — not external ground truth"
        lines += [f"On {METRICS[metric]}{external} ({TITLES[decoding]}): the most lenient value "
                  f"whose loss, and that of every value nearer the lossless end, stays "
                  f"≤ {MAX_LOSS:.0%} of TARGET at the upper 95 % CI bound.", "",
                  "| rule or baseline | value | loss upper bound | latency vs TARGET | speed vs SPECULATIVE |",
                  "|---|---:|---:|---:|---:|"]
        for group, k in per_group.items():
            lines.append(f"| {group} | – | – | – | – |" if k is None else
                         f"| {group} | {_value(group, k['value'])} | {k['rel_loss_hi']:.2%} | "
                         f"{k['latency_vs_target']:.2f} | {_speed(k['speed_vs_speculative'])} |")
        lines.append("")
    if not analysis["knob"]:
        lines += [f"No metric's DRAFT − TARGET CI excludes 0 in {TITLES[decoding]} decoding on these "
                  "tasks: no α can be read off (more tasks, or a pair further apart).", ""]
    return lines


def baseline_table(analysis: dict, decoding: str) -> list[str]:
    """Per rule (and lenience), on each separating metric: does it beat truncation + SD at equal
    speed?"""
    per_metric = analysis.get("versus_baseline", {})
    metrics = [m for m in per_metric if per_metric[m]]
    if not metrics:
        return []
    lines = [f"#### Against truncation + SD at equal speed ({decoding})", "",
             "Baseline: the truncation configurations and SPECULATIVE (truncation off). A setting is "
             "beaten where a baseline runs at least as fast with at least its mean quality; "
             "otherwise the paired CI against the best baseline at ≥ its speed is given, or it "
             "is faster than every baseline.", "",
             "| rule | " + " | ".join(METRICS[m] for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    groups = [g for g in KNOB_GROUPS if any(g in per_metric[m] for m in metrics)]
    for group in groups:
        cells = []
        for m in metrics:
            v = per_metric[m].get(group)
            if v is None:
                cells.append("–")
                continue
            better = [c for c in v["configs"] if c["verdict"] == "better"]
            faster = [c for c in v["configs"] if c["verdict"] == "faster than every baseline"]
            if better:
                c = max(better, key=lambda c: c["ci"]["lo"])
                cells.append(f"yes: {_value(group, c['value'])} vs {c['baseline']}, "
                             f"{_ci(c['ci'])}")
            elif faster:
                cells.append("only where faster than every baseline (" + ", ".join(
                    _value(group, c["value"]) for c in faster) + ")")
            else:
                worst = v["configs"][0]
                cells.append(f"no: every setting is beaten (e.g. {_value(group, worst['value'])} "
                             f"by {worst['baseline']})")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines + [""]


def choosing_alpha(results: dict) -> list[str]:
    """The README's "Choosing α" table: per rule and baseline, the value at which quality stays
    within 1 % of TARGET at the upper CI bound, on each decoding's primary metric, and the speed
    it buys."""
    heads, cols = [], []
    for decoding in ("sampled", "greedy"):
        a = results["analysis"][decoding]
        metric, external = primary_metric(a)
        label = "no separating metric" if metric is None else \
            METRICS[metric] + ("" if external else ", not external")
        heads.append(f"{decoding}: {label} | speed vs TARGET | vs SPECULATIVE")
        cols.append(a["knob"].get(metric, {}) if metric else {})
    lines = ["| rule or baseline | " + " | ".join(heads) + " |", "|---|" + "---:|" * 6]
    for group in KNOB_GROUPS:
        cells = []
        for per in cols:
            k = per.get(group, "absent") if per else None
            if k == "absent":
                cells += ["(not measured)", "", ""]
            elif k is None:
                cells += ["–", "", ""]
            else:
                cells += [f"{k['value']:g} (loss ≤ {k['rel_loss_hi']:.2%})",
                          _speed(1 / k["latency_vs_target"]), _speed(k["speed_vs_speculative"])]
        lines.append(f"| {group} ({KNOB_SYMBOL[group]}) | " + " | ".join(cells) + " |")
    return lines + ["", f"From `benchmarks/frontier.json` ({results['started']}). \"–\": no measured "
                    "value could be shown within 1 % (the CI may be too wide rather than the loss "
                    "large); lenience and truncation are sampled only."]


def fill_readme(readme: Path, table: list[str]) -> bool:
    """Replace the text between the README's choosing-alpha markers; False if they are absent."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + "\n".join(table) + "\n" + README_END + tail)
    return True


def pilot_table(pilot: dict) -> list[str]:
    """The pilot's sizing (frontier_stats.pilot_sizing) as markdown."""
    lines = [f"Pilot: {pilot['plan']['tasks']} tasks per family ({', '.join(pilot['plan']['families'])}); "
             f"tasks needed for a {PILOT_HALF_WIDTH:.1%} CI half-width of the relative loss, "
             f"n ≥ (1.96·s_d / ({PILOT_HALF_WIDTH}·|mean TARGET|))², against the full plan's "
             f"{pilot['full_plan_tasks']} tasks (a metric of one family gets its share).", "",
             "| decoding | metric | TARGET | comparison | Δ mean | s_d | tasks needed | plan "
             "tasks | half-width at plan | separation at plan (half-widths) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for decoding, per in pilot["sizing"].items():
        for metric, entry in per.items():
            for name, c in entry["comparisons"].items():
                lines.append(
                    f"| {decoding} | {METRICS[metric]} | {entry['target_mean']:.3f} | {name} | "
                    f"{c['diff']:+.4f} | {c['sd']:.4f} | {c['tasks_needed'] or '–'} | "
                    f"{c['plan_tasks']} | {c['rel_half_width_at_plan']:.2%} | "
                    f"{c['separation_at_plan']:.1f} |")
    return lines + ["", "\"TARGET reseeded\" is a configuration equal to TARGET (sampled); greedy, "
                    "such a configuration repeats TARGET's outputs exactly, and DRAFT's spread bounds "
                    "the configurations between the two. \"–\": nothing to size from (no spread in "
                    "the pilot, or a TARGET mean of 0). The pilot's s_d is itself an estimate: n "
                    "scales with s_d², so a 100-task pilot leaves n uncertain by about ±30 %."]


def _intro(results: dict) -> str:
    plan, timings = results["plan"], results["timings_s"]
    where = (f"in process (`quality_on: engine`: the service's request validation, loop, workers "
             f"and sampler, {plan['chunk']} tasks sharing each forward), and the first "
             f"{plan['service_check_tasks']} tasks of every configuration also through the gRPC "
             f"service (agreement below)") if plan.get("quality_on", "service") == "engine" \
        else f"through the gRPC service, {plan['streams']} concurrent streams"
    families = results.get("tasks", {}).get("families", ["code"])
    return (f"{plan['tasks']} tasks per family ({', '.join(families)}: held-out line completion; "
            f"short questions through the chat template, capitals, antonyms and irregular "
            f"plurals), every configuration on the same tasks (sampled: the same per-task seed, "
            f"{plan['seed']} + task index), run {where}; each stream stops once its scored line is "
            f"complete. Target log-likelihood: the target's mean log-probability per token (fp32) "
            f"of the continuation up to that line's end (not external ground truth: a sharper "
            f"sampler scores higher). Δ: the configuration minus TARGET of the same decoding, with "
            f"a paired bootstrap 95 % CI (10 000 resamples). Latency relative to TARGET: TARGET's "
            f"tokens/s over the configuration's, through the service, single stream, "
            f"{plan['speed_tasks']} tasks × {plan['speed_rounds']} interleaved rounds at "
            f"{plan.get('gamma')} draft tokens and full length; the sequential cascade runs in "
            f"process on the first {plan['seq_tasks']} tasks and is timed against the in-process "
            f"TARGET. Baselines, sampled only: lossy SD with lenience l ∈ {{{_grid(plan, 'lenience')}}}; "
            f"truncation + SD with min_p ∈ {{{_grid(plan, 'min_p')}}} and η ∈ {{{_grid(plan, 'eta')}}}, "
            f"whose quality is measured in TARGET mode and speed in SPECULATIVE mode (both sample "
            f"the same truncated target exactly). Run time: "
            + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in timings.items()) + ".")


def _grid(plan: dict, key: str) -> str:
    return ", ".join(f"{v:g}" for v in plan.get(key, ())) or "none"


def _goals(results: dict) -> list[str]:
    lines = ["| goal (issue 25) | measured | goal | met | detail |", "|---|---:|---:|---|---|"]
    for name, (value, goal, op, detail) in results.get("goals", {}).items():
        met = value >= goal if op == "≥" else value <= goal
        lines.append(f"| {name} | {value:.2f} | {op} {goal} | {'yes' if met else 'no'} | {detail} |")
    return lines


def _sd_ends(results: dict) -> list[str]:
    lines = ["| rule at its SD end | greedy tok/s | vs SPECULATIVE | sampled tok/s | vs SPECULATIVE |",
             "|---|---:|---:|---:|---:|"]
    speed = results["speed"]
    names = [n for n, s in speed["greedy"].items() if s.get("sd_end")]
    for name in ["SPECULATIVE"] + names:
        cells = []
        for decoding in ("greedy", "sampled"):
            s = speed[decoding][name]["tokens_per_s"]
            cells += [f"{s:.1f}", f"{s / speed[decoding]['SPECULATIVE']['tokens_per_s']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _service_check(results: dict) -> list[str]:
    check = results.get("service_check") or {}
    if not check:
        return []
    lines = ["### The service gives the same outputs", "",
             "The first tasks of every configuration, through the gRPC service against the in-process "
             "quality pass (same tasks, same seeds):", "",
             "| decoding | configurations | outputs token for token identical | same scored line |",
             "|---|---:|---:|---:|"]
    for decoding, per in check.items():
        tasks = sum(c["tasks"] for c in per.values())
        same = sum(c["identical"] for c in per.values())
        line = sum(c["same_line"] for c in per.values())
        lines.append(f"| {decoding} | {len(per)} | {same} / {tasks} ({same / tasks:.0%}) | "
                     f"{line} / {tasks} ({line / tasks:.0%}) |")
    if results["plan"].get("dtype") != "float32":
        lines += ["", "In bf16 a row's logits depend slightly on what shares its forward, so a "
                  "near-tie of the target can be decided differently in process and in the service."]
    return lines + [""]


def _separation(results: dict) -> list[str]:
    lines = ["| decoding | metric | external | TARGET | DRAFT | DRAFT − TARGET [95 % CI] | "
             "half-widths apart | SPECULATIVE's loss, upper bound | separates |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for decoding, a in results["analysis"].items():
        t, d, s = a["rows"]["TARGET"], a["rows"]["DRAFT"], a["rows"]["SPECULATIVE"]
        for metric, label in METRICS.items():
            if math.isnan(t[metric]):
                continue
            lines.append(
                f"| {decoding} | {label} | {'yes' if metric in EXTERNAL else 'no'} | "
                f"{t[metric]:.3f} | {d[metric]:.3f} | {_ci(d[f'{metric}_ci'])} | "
                f"{a.get('separation', {}).get(metric, math.nan):.1f} | "
                f"{s[f'{metric}_ci']['rel_loss_hi']:.2%} | "
                f"{'yes' if metric in a['separating_metrics'] else 'no'} |")
    return lines + ["", "SPECULATIVE samples TARGET's distribution exactly (lossless), so its loss "
                    "bound is the run's power: \"within 1 %\" can be shown on a metric only where "
                    "that bound is well under 1 %."]


def section(results: dict, markdown: Path, out_dir: Path) -> str:
    lines = ["## Quality–latency frontier", "", f"Reproduce: `{COMMAND}`", "", _intro(results), "",
             *_goals(results), "", "### Which metric separates TARGET from DRAFT", "",
             *_separation(results), "", "### Cascade rounds at the SD end", "",
             "Each rule at the α where π = p (TOKEN_V3: where π keeps only p's argmax, = p when "
             "greedy) does SPECULATIVE's verification; its rounds should cost the same.", "",
             *_sd_ends(results), ""]
    lines += _service_check(results)
    for decoding, a in results["analysis"].items():
        png = out_dir / f"frontier_{decoding}.png"
        plot(a, decoding, png)
        front = {n for names in a["pareto"].values() for n in names}
        title = TITLES[decoding]
        short = {"target_loglik": "log-lik", "edit_similarity": "edit sim.",
                 "exact_match": "exact", "fact_accuracy": "facts"}
        lines += [f"### {title[0].upper() + title[1:]}", "",
                  f"![frontier {decoding}]({os.path.relpath(png, markdown.parent)})", "",
                  "| configuration | latency vs TARGET | speed vs SPECULATIVE | "
                  + " | ".join(f"Δ {short[m]}" for m in METRICS) + " | Pareto (metrics) |",
                  "|---|---:|---:|" + "---:|" * len(METRICS) + "---|"]
        for name, r in sorted(a["rows"].items(), key=lambda kv: kv[1]["latency_vs_target"]):
            on = ", ".join(short[m] for m in METRICS if name in a["pareto"][m]) if name in front else ""
            latency = r["latency_vs_target"]
            lines.append(f"| {name} | {latency:.2f} | " if math.isfinite(latency) else f"| {name} | – | ")
            lines[-1] += f"{_speed(r['speed_vs_speculative'])} | " + \
                " | ".join(_ci(r[f"{m}_ci"]) for m in METRICS) + f" | {on} |"
        best = best_cascade(a)
        lines += ["", f"Fastest cascade within {MAX_LOSS:.0%} of TARGET (upper CI bound) on an "
                  "external metric that separates DRAFT from TARGET: " + ("none" if best is None else
                  f"{best['name']}, {best['speed_vs_speculative']:.2f}× SPECULATIVE "
                  f"({METRICS[best['metric']]}, loss ≤ {best['rel_loss_hi']:.2%})") + ".", ""]
        lines += baseline_table(a, decoding)
        lines += ["#### The knob: α (or l, min_p, η) within 1 % of TARGET", ""] + knob_table(a, decoding)
    table = choosing_alpha(results)
    (out_dir / "choosing_alpha.md").write_text("\n".join(table) + "\n")
    lines += ["### Choosing α (the README's table)", "", *table, ""]
    est = results["estimate_full_run_s"]
    lines += [f"Estimated time of the full plan (FrontierPlan defaults) from this run's unit costs: "
              f"{est['total_s'] / 60:.0f} min (" + ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in est.items() if k != "total_s")
              + ").", ""]
    return "\n".join(lines)


def write(results: dict, out_dir: Path, markdown: Path) -> None:
    markdown.write_text(section(results, markdown, out_dir))
