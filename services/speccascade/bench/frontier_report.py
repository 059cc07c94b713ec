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


def section(results: dict, markdown: Path, out_dir: Path) -> str:
    plan, timings = results["plan"], results["timings_s"]
    lines = ["## Quality–latency frontier", "", f"Reproduce: `{COMMAND}`", "",
             f"{plan['tasks']} held-out line-completion tasks, every configuration on the same tasks "
             f"(sampled: the same per-task seed, {plan['seed']} + task index), {plan['streams']} "
             f"concurrent streams through the gRPC service, each stopped once its line is complete. "
             f"Target log-likelihood: the target's mean log-probability per token of the "
             f"continuation up to the end of the predicted line. Δ: the configuration minus TARGET "
             f"of the same decoding, with a paired bootstrap 95 % CI (10 000 resamples). Latency "
             f"relative to TARGET: TARGET's tokens/s over the configuration's, single stream, "
             f"{plan['speed_tasks']} tasks × {plan['speed_rounds']} interleaved rounds at "
             f"{results['plan'].get('gamma')} draft tokens; the sequential cascade runs in process "
             f"on the first {plan['seq_tasks']} tasks and is timed against the in-process TARGET. "
             f"Lossy speculative decoding is not included (it needs a lenience input to the "
             f"acceptance test in sampling.py). Run time: "
             + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in timings.items()) + ".", "",
             "### Which metric separates TARGET from DRAFT", "",
             "| decoding | metric | TARGET | DRAFT | DRAFT − TARGET [95 % CI] | separates |",
             "|---|---|---:|---:|---:|---|"]
    for decoding, a in results["analysis"].items():
        t, d = a["rows"]["TARGET"], a["rows"]["DRAFT"]
        for metric, label in METRICS.items():
            lines.append(f"| {decoding} | {label} | {t[metric]:.3f} | {d[metric]:.3f} | "
                         f"{_ci(d[f'{metric}_ci'])} | {'yes' if metric in a['separating_metrics'] else 'no'} |")
    lines.append("")
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
