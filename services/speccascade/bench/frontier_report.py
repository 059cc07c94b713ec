"""The "Quality–latency frontier" markdown section and its PNG plots, from frontier.json's dict."""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from speccascade.bench.frontier import MAX_LOSS, METRICS, best_cascade  # noqa: E402

COMMAND = "make frontier   # = speccascade bench frontier --out benchmarks --markdown benchmarks/frontier.md"
TITLES = {"greedy": "greedy", "sampled": "sampled (T 0.8, top_p 0.95)"}


def _ci(ci: dict, digits: int = 3) -> str:
    return f"{ci['diff']:+.{digits}f} [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"


def plot(analysis: dict, decoding: str, path: Path) -> None:
    """Quality against latency relative to TARGET, one panel per metric. Error bars: TARGET's mean
    plus the paired 95 % CI of the difference (the comparison the CIs are for). Ringed: the
    Pareto front."""
    rows = analysis["rows"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 5))
    for ax, (metric, label) in zip(axes, METRICS.items()):
        base = rows["TARGET"][metric]

        def point(r):
            ci = r[f"{metric}_ci"]
            return r["latency_vs_target"], base + ci["diff"], [[ci["diff"] - ci["lo"]], [ci["hi"] - ci["diff"]]]

        by_rule: dict[str, list] = {}
        for name, r in rows.items():
            if r["rule"] and not name.startswith("SEQUENTIAL"):
                by_rule.setdefault(r["rule"], []).append(r)
        for rule, members in by_rule.items():
            members.sort(key=lambda r: r["latency_vs_target"])
            xs, ys, errs = zip(*map(point, members))
            ax.errorbar(xs, ys, yerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]],
                        marker="o", capsize=3, label=rule)
        seq = sorted((r for n, r in rows.items() if n.startswith("SEQUENTIAL")),
                     key=lambda r: r["latency_vs_target"])
        if seq:
            xs, ys, errs = zip(*map(point, seq))
            ax.errorbar(xs, ys, yerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]],
                        fmt="k--x", capsize=3, label="sequential cascade (Chow, in process)")
        for name, marker in (("SPECULATIVE", "*"), ("TARGET", "s"), ("DRAFT", "v")):
            x, y, err = point(rows[name])
            ax.errorbar([x], [y], yerr=err, fmt=marker, markersize=12, color="black", label=name)
        front = [rows[n] for n in analysis["pareto"][metric]]
        ax.plot([r["latency_vs_target"] for r in front], [r[metric] for r in front], "o:",
                color="grey", markersize=16, markerfacecolor="none", label="Pareto front")
        ax.set_xlabel("latency relative to TARGET (lower is faster)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Quality–latency frontier, {TITLES[decoding]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def knob_table(analysis: dict, decoding: str) -> list[str]:
    lines = []
    for metric, per_rule in analysis["knob"].items():
        lines += [f"On {METRICS[metric]} ({TITLES[decoding]}; its DRAFT − TARGET CI excludes 0): "
                  f"the most lenient α whose loss, and that of every α nearer the SD end, stays "
                  f"≤ {MAX_LOSS:.0%} of TARGET at the upper 95 % CI bound.", "",
                  "| rule | α | loss upper bound | latency vs TARGET | speed vs SPECULATIVE |",
                  "|---|---:|---:|---:|---:|"]
        for rule, k in per_rule.items():
            lines.append(f"| {rule} | – | – | – | – |" if k is None else
                         f"| {rule} | {k['alpha']:g} | {k['rel_loss_hi']:.2%} | "
                         f"{k['latency_vs_target']:.2f} | {k['speed_vs_speculative']:.2f}× |")
        lines.append("")
    if not analysis["knob"]:
        lines += [f"No metric's DRAFT − TARGET CI excludes 0 in {TITLES[decoding]} decoding on these "
                  "tasks: no α can be read off (more tasks, or a pair further apart).", ""]
    return lines


def _intro(results: dict) -> str:
    plan, timings = results["plan"], results["timings_s"]
    where = (f"in process (`quality_on: engine`: the service's request validation, loop, workers "
             f"and sampler, {plan['chunk']} tasks sharing each forward; through the service the "
             f"full plan takes about 110 min here, its verifier serializing the calls), and the "
             f"first {plan['service_check_tasks']} tasks of every configuration also through the "
             f"gRPC service (agreement below)") if plan.get("quality_on", "service") == "engine" \
        else f"through the gRPC service, {plan['streams']} concurrent streams"
    return (f"{plan['tasks']} held-out line-completion tasks, every configuration on the same tasks "
            f"(sampled: the same per-task seed, {plan['seed']} + task index), run {where}; each "
            f"stream stops once its line is complete. Target log-likelihood: the target's mean "
            f"log-probability per token (fp32) of the continuation up to the end of the predicted "
            f"line. Δ: the configuration minus TARGET of the same decoding, with a paired "
            f"bootstrap 95 % CI (10 000 resamples). Latency relative to TARGET: TARGET's tokens/s "
            f"over the configuration's, through the service, single stream, {plan['speed_tasks']} "
            f"tasks × {plan['speed_rounds']} interleaved rounds at {plan.get('gamma')} draft tokens "
            f"and full length; the sequential cascade runs in process on the first "
            f"{plan['seq_tasks']} tasks and is timed against the in-process TARGET. Lossy "
            f"speculative decoding is not included (it needs a lenience input to the acceptance "
            f"test in sampling.py). Run time: "
            + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in timings.items()) + ".")


def _goals(results: dict) -> list[str]:
    lines = ["| goal (issue 17) | measured | goal | met | detail |", "|---|---:|---:|---|---|"]
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
             "| decoding | configurations | outputs token for token identical | same predicted line |",
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


def section(results: dict, markdown: Path, out_dir: Path) -> str:
    lines = ["## Quality–latency frontier", "", f"Reproduce: `{COMMAND}`", "", _intro(results), "",
             *_goals(results), "",
             "### Which metric separates TARGET from DRAFT", "",
             "| decoding | metric | TARGET | DRAFT | DRAFT − TARGET [95 % CI] | separates |",
             "|---|---|---:|---:|---:|---|"]
    for decoding, a in results["analysis"].items():
        t, d = a["rows"]["TARGET"], a["rows"]["DRAFT"]
        for metric, label in METRICS.items():
            lines.append(f"| {decoding} | {label} | {t[metric]:.3f} | {d[metric]:.3f} | "
                         f"{_ci(d[f'{metric}_ci'])} | {'yes' if metric in a['separating_metrics'] else 'no'} |")
    lines += ["", "### Cascade rounds at the SD end", "",
              "Each rule at the α where π = p (TOKEN_V3: where π keeps only p's argmax, = p when "
              "greedy) does SPECULATIVE's verification; its rounds should cost the same.", "",
              *_sd_ends(results), ""]
    lines += _service_check(results)
    for decoding, a in results["analysis"].items():
        png = out_dir / f"frontier_{decoding}.png"
        plot(a, decoding, png)
        front = {n for names in a["pareto"].values() for n in names}
        title = TITLES[decoding]
        lines += [f"### {title[0].upper() + title[1:]}", "",
                  f"![frontier {decoding}]({os.path.relpath(png, markdown.parent)})", "",
                  "| configuration | latency vs TARGET | speed vs SPECULATIVE | Δ log-lik | "
                  "Δ edit similarity | Δ exact match | Pareto (metrics) |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, r in sorted(a["rows"].items(), key=lambda kv: kv[1]["latency_vs_target"]):
            speed = "–" if r["speed_vs_speculative"] is None else f"{r['speed_vs_speculative']:.2f}×"
            on = ", ".join(m for m in METRICS if name in a["pareto"][m]) if name in front else ""
            latency = r["latency_vs_target"]
            lines.append(f"| {name} | {latency:.2f} | {speed} | " if math.isfinite(latency) else
                         f"| {name} | – | {speed} | ")
            lines[-1] += " | ".join(_ci(r[f"{m}_ci"]) for m in METRICS) + f" | {on} |"
        best = best_cascade(a)
        lines += ["", f"Fastest cascade within {MAX_LOSS:.0%} of TARGET (upper CI bound) on a "
                  "separating metric: " + ("none" if best is None else
                  f"{best['name']}, {best['speed_vs_speculative']:.2f}× SPECULATIVE "
                  f"({METRICS[best['metric']]}, loss ≤ {best['rel_loss_hi']:.2%})") + ".",
                  "", "#### The knob: α within 1 % of TARGET", ""] + knob_table(a, decoding)
    est = results["estimate_full_run_s"]
    lines += [f"Estimated time of the full plan (FrontierPlan defaults) from this run's unit costs: "
              f"{est['total_s'] / 60:.0f} min (" + ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in est.items() if k != "total_s")
              + ").", ""]
    return "\n".join(lines)


def write(results: dict, out_dir: Path, markdown: Path) -> None:
    markdown.write_text(section(results, markdown, out_dir))
