"""BENCHMARKS.md and the PNG plots from a results dict (see bench/run.py)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COMMAND = "make bench   # = speccascade bench --out benchmarks --markdown BENCHMARKS.md"


def _speed_table(speed: dict) -> list[str]:
    rows = ["| configuration | tokens/s | TTFT p50 ms | ITL p50 / p95 ms | mean accepted length | "
            "round: draft / hidden / verify / other ms | overlap |",
            "|---|---:|---:|---:|---:|---|---:|"]
    for name, s in speed.items():
        other = s["round_ms"] - s["round_verify_ms"] - s["round_draft_ms"] + s["round_hidden_draft_ms"]
        rows.append(f"| {name} | {s['tokens_per_s']:.1f} | {s['ttft_ms_p50']:.0f} | "
                    f"{s['itl_ms_p50']:.1f} / {s['itl_ms_p95']:.1f} | {s['mean_accepted_length']:.2f} | "
                    f"{s['round_draft_ms']:.1f} / {s['round_hidden_draft_ms']:.1f} / "
                    f"{s['round_verify_ms']:.1f} / {other:.1f} | {s['overlap_fraction']:.2f} |")
    return rows


def _cascade_table(cascades: dict, sequential: dict, target_latency: float) -> list[str]:
    rows = ["| configuration | exact match | edit similarity | target log-lik | deferral rate | "
            "latency vs TARGET |", "|---|---:|---:|---:|---:|---:|"]
    for name, c in cascades.items():
        rows.append(f"| {name} | {c['exact_match']:.3f} | {c['edit_similarity']:.3f} | "
                    f"{c['target_loglik']:.2f} | {c['deferral_rate']:.2f} | "
                    f"{c['latency_ms_mean'] / target_latency:.2f} |")
    for name, c in sequential.items():
        rows.append(f"| sequential cascade {name} | {c['exact_match']:.3f} | "
                    f"{c['edit_similarity']:.3f} | – | {c['deferral_rate']:.2f} | "
                    f"{c['latency_ms_mean'] / target_latency:.2f} |")
    return rows


def _cpu_table(concurrency: dict) -> list[str]:
    """CPU ms per speculative round by process, per concurrency level: where the cores went."""
    levels = sorted(concurrency, key=int)
    if not all("cpu_ms_per_round" in concurrency[n] for n in levels):
        return []
    names = sorted({name for n in levels for name, ms in concurrency[n]["cpu_ms_per_round"].items()
                    if ms >= 0.5})
    lines = ["CPU time per round (ms, all cores, by process) and how busy both cores were:", "",
             "| process | " + " | ".join(f"{n} streams" for n in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{concurrency[n]['cpu_ms_per_round'].get(name, 0.0):.1f}" for n in levels) + " |")
    lines.append("| **cores busy** | " + " | ".join(
        f"{concurrency[n]['cpu_busy_fraction']:.0%}" for n in levels) + " |")
    return lines


def plot_speed(results: dict, path: Path) -> None:
    speed = results["service"]["speed"]
    derived, target = results["derived"], speed["TARGET"]["tokens_per_s"]
    names = list(speed)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(names, [speed[n]["tokens_per_s"] for n in names], color="tab:blue", label="service")
    ax.barh(["HF assisted (in process)", "HF target (in process)"],
            [results["in_process"]["hf_assisted"]["tokens_per_s"],
             results["in_process"]["hf_target"]["tokens_per_s"]], color="tab:gray", label="peer")
    for bound, style in ((derived["sequential_bound"], ":"), (derived["pipelined_bound"], "--")):
        ax.axvline(bound * target, color="tab:red", linestyle=style)
    ax.set_xlabel("tokens/s, single stream (red: sequential ⋯ and pipelined -- bounds)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cascades(results: dict, path: Path) -> None:
    """Quality against latency relative to TARGET: edit similarity (exact match of so small a
    model is too coarse to plot) and the target's log-likelihood of the output."""
    cascades = results["service"]["cascade"]
    target_latency = cascades["TARGET"]["latency_ms_mean"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, metric, label in ((axes[0], "edit_similarity", "line-completion edit similarity"),
                              (axes[1], "target_loglik", "target log-likelihood (nats/token)")):
        by_rule: dict[str, list] = {}
        for c in cascades.values():
            rule = c["fields"].get("deferral_rule")
            if rule:
                by_rule.setdefault(rule, []).append((c["latency_ms_mean"] / target_latency, c[metric]))
        for rule, points in by_rule.items():
            ax.plot(*zip(*sorted(points)), marker="o", label=rule)
        seq = results["sequential_cascade"]
        if metric in next(iter(seq.values())):
            ax.plot([c["latency_ms_mean"] / target_latency for c in seq.values()],
                    [c[metric] for c in seq.values()], "k--x", label="sequential cascade (Chow)")
        for name, marker in (("SPECULATIVE", "*"), ("TARGET", "s"), ("DRAFT", "v")):
            c = cascades[name]
            ax.plot(c["latency_ms_mean"] / target_latency, c[metric], marker, markersize=12,
                    color="black", label=name)
        ax.set_xlabel("latency relative to TARGET (lower is faster)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_concurrency(results: dict, path: Path) -> None:
    conc = results["service"]["concurrency"]
    streams = sorted(conc, key=int)
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(streams, [conc[s]["aggregate_tokens_per_s"] for s in streams], "o-", label="tokens/s")
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("aggregate tokens/s")
    ax2 = ax1.twinx()
    ax2.plot(streams, [conc[s]["latency_ms_p95"] for s in streams], "s--", color="tab:orange")
    ax2.set_ylabel("request latency p95 (ms)", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path, markdown: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_speed(results, out_dir / "speed.png")
    plot_cascades(results, out_dir / "cascades.png")
    plot_concurrency(results, out_dir / "concurrency.png")
    d, steps = results["derived"], results["steps_ms"]
    rel = lambda p: Path(p).relative_to(markdown.parent) if markdown.parent in Path(p).parents else p  # noqa: E731
    cascades = results["service"]["cascade"]
    lines = [
        "# Benchmarks", "",
        f"Produced by `{COMMAND}` on {results['started']} (2 CPU cores, one torch thread per "
        "replica). All numbers come from one run; compare them as ratios. Raw data: "
        f"`{rel(out_dir / 'results.json')}`.", "",
        "## Goals (issue 5)", "", "| goal | measured | target | met |", "|---|---:|---:|:-:|"]
    for name, (value, goal, op) in d["goals"].items():
        met = value >= goal if op == "≥" else value <= goal
        lines.append(f"| {name} | {value:.2f} | {op} {goal} | {'yes' if met else 'no'} |")
    lines += ["", f"Measured α = {d['alpha']:.3f} (from the pipelined run's mean accepted length), "
              f"c = {d['cost_ratio_c']:.3f}; steps (ms): target {steps['target']:.1f}, draft "
              f"{steps['draft']:.1f}, verify(γ+1) {steps['verify']:.1f}. Bounds (REFERENCE.md §2): "
              f"sequential {d['sequential_bound']:.2f}×, pipelined {d['pipelined_bound']:.2f}×. "
              f"Greedy outputs of HF target, our in-process TARGET and SPECULATIVE equal: "
              f"{results['in_process_greedy_equal']}; through the service, every greedy "
              f"SPECULATIVE configuration equals TARGET token for token: "
              f"{d['greedy_equal_to_target']}.", "",
              f"RPC floor in this run (median empty call): router → verifier over the service's "
              f"transport {results['rpc_floor_ms']['serve_handle']:.2f} ms, raw Ray actor "
              f"{results['rpc_floor_ms']['ray_actor']:.2f} ms. Every round waits for at least one "
              "handle call to the verifier, so non-model time per round cannot fall below the "
              "first.", "",
              f"Adaptive γ against the best fixed γ ({d['best_fixed_gamma']}): "
              + ", ".join(f"{name} {ratio:.2f}×" for name, ratio in d["adaptive_over_best_fixed"].items())
              + ".", "",
              "## Speed through the gRPC service (single stream)", "",
              f"![speed]({rel(out_dir / 'speed.png')})", "", *_speed_table(results["service"]["speed"]),
              "", "In process: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s"
                                            for k, v in results["in_process"].items()) + ".", "",
              "## Cascades: quality against latency", "",
              f"![cascades]({rel(out_dir / 'cascades.png')})", "",
              *_cascade_table(cascades, results["sequential_cascade"],
                              cascades["TARGET"]["latency_ms_mean"]), "",
              "## Concurrency", "", f"![concurrency]({rel(out_dir / 'concurrency.png')})", "",
              "| streams | aggregate tokens/s | latency p95 ms | ITL p95 ms |", "|---:|---:|---:|---:|"]
    for streams, c in sorted(results["service"]["concurrency"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {streams} | {c['aggregate_tokens_per_s']:.1f} | {c['latency_ms_p95']:.0f} | "
                     f"{c['itl_ms_p95']:.1f} |")
    lines += ["", *_cpu_table(results["service"]["concurrency"])]
    markdown.write_text("\n".join(lines) + "\n")
