"""BENCHMARKS.md and the PNG plots from a results dict (see bench/run.py)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from speccascade.bench.limits import explain, other_ms  # noqa: E402
from speccascade.bench.sweep import CONTROLLER, cell  # noqa: E402

COMMAND = "make bench   # = speccascade bench --out benchmarks --markdown BENCHMARKS.md"


def _frontier(markdown: Path, out_dir: Path) -> list[str]:
    """The frontier section (bench/frontier_report.py) from out_dir/frontier.json, if it was run."""
    import json

    from speccascade.bench.frontier_report import section

    path = out_dir / "frontier.json"
    if not path.exists():
        return ["## Quality–latency frontier", "", "Not run into this folder: `make frontier`.", ""]
    return [section(json.loads(path.read_text()), markdown, out_dir), ""]


def _speed_table(speed: dict) -> list[str]:
    rows = ["| configuration | tokens/s | TTFT p50 ms | ITL p50 / p95 ms | mean accepted length | "
            "round: draft / hidden / verify / other ms | overlap | drafted ahead / discarded, tokens per round |",
            "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, s in speed.items():
        rows.append(f"| {name} | {s['tokens_per_s']:.1f} | {s['ttft_ms_p50']:.0f} | "
                    f"{s['itl_ms_p50']:.1f} / {s['itl_ms_p95']:.1f} | {s['mean_accepted_length']:.2f} | "
                    f"{s['round_draft_ms']:.1f} / {s['round_hidden_draft_ms']:.1f} / "
                    f"{s['round_verify_ms']:.1f} / {other_ms(s):.1f} | {s['overlap_fraction']:.2f} | "
                    f"{s.get('round_drafted_ahead', 0.0):.2f} / {s.get('round_discarded_draft_tokens', 0.0):.2f} |")
    return rows


def _profile_line(p: dict) -> str:
    shares = ", ".join(f"{name} {share:.0%}" for name, share in p["self_share"].items())
    return (f"Router profile (py-spy, {p['samples']} samples at {p['rate_hz']} Hz over "
            f"{p['seconds']:g} s of single-stream greedy SPECULATIVE; each sample charged to the "
            f"library of its innermost Python frame): {shares}. speccascade's code is on the stack "
            f"in {p['speccascade_on_stack']:.0%} of samples.")


def _noise_line(speed: dict, gamma: int) -> str:
    """The γ sweep repeats the default configuration: the two runs' gap is this run's noise."""
    a, b = speed["SPECULATIVE pipelined"], speed.get(f"SPECULATIVE γ={gamma}")
    if b is None:
        return ""
    return (f"Noise: `SPECULATIVE γ={gamma}` repeats `SPECULATIVE pipelined` (same fields, same "
            f"prompts, measured at another time in this run): {b['tokens_per_s']:.1f} against "
            f"{a['tokens_per_s']:.1f} tok/s ({b['tokens_per_s'] / a['tokens_per_s']:.2f}×). Read "
            f"single-stream gaps smaller than that as noise.")


def _draft_ahead_line(tables: dict[str, dict]) -> str:
    """The draft-ahead gate (the default) against always and never drafting ahead."""
    parts = []
    for kind, t in tables.items():
        g, a = t["SPECULATIVE pipelined"], t["SPECULATIVE always ahead"]
        parts.append(f"{kind}: gated {g['tokens_per_s']:.1f} tok/s drafting "
                     f"{g['round_drafted_ahead']:.2f} tokens ahead per round and discarding "
                     f"{g['round_discarded_draft_tokens']:.2f}; always {a['tokens_per_s']:.1f} tok/s, "
                     f"{a['round_drafted_ahead']:.2f} ahead, {a['round_discarded_draft_tokens']:.2f} "
                     f"discarded; never {t['SPECULATIVE sequential']['tokens_per_s']:.1f} tok/s")
    return ("Draft-ahead (the default drafts block k+1 during verification only when the running "
            "acceptance says it will likely be used; `pipelined: true` always does): "
            + "; ".join(parts) + ".")


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


def _cpu_table(columns: dict[str, dict], busy: bool = False) -> list[str]:
    """CPU ms per round by process, one column per configuration or load level."""
    names = sorted({name for c in columns.values() for name, ms in c["cpu_ms_per_round"].items()
                    if ms >= 0.5})
    lines = ["| process | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{c['cpu_ms_per_round'].get(name, 0.0):.1f}" for c in columns.values()) + " |")
    if busy:
        lines.append("| **cores busy** | " + " | ".join(
            f"{c['cpu_busy_fraction']:.0%}" for c in columns.values()) + " |")
    return lines


def _concurrency_table(conc: dict) -> list[str]:
    rows = ["| streams | mode | aggregate tokens/s | latency p50 / p95 ms | ITL p95 ms | "
            "mean batch: verifier / drafter |", "|---:|---|---:|---:|---:|---:|"]
    for streams in sorted({int(k) for levels in conc.values() for k in levels}):
        for mode, levels in conc.items():
            c = levels.get(streams, levels.get(str(streams)))
            if c is None:
                continue
            batch = c["mean_batch_size"]
            rows.append(f"| {streams} | {mode} | {c['aggregate_tokens_per_s']:.1f} | "
                        f"{c['latency_ms_p50']:.0f} / {c['latency_ms_p95']:.0f} | "
                        f"{c['itl_ms_p95']:.1f} | {batch.get('verifier', 0):.2f} / "
                        f"{batch.get('drafter', 0):.2f} |")
    return rows


def _sweep_table(table: dict) -> list[str]:
    """Aggregate tokens/s by configuration and stream count; the best fixed γ of a level in bold,
    the controller's mean γ beside its speed."""
    levels = sorted({int(k) for cells in table.values() for k in cells})
    best = {n: max((name for name in table if name.startswith("γ=")),
                   key=lambda name: cell(table, name, n)["aggregate_tokens_per_s"]) for n in levels}
    rows = ["| configuration | " + " | ".join(f"{n} stream{'s' * (n > 1)}" for n in levels) + " |",
            "|---|" + "---:|" * len(levels)]
    for name in table:
        out = []
        for n in levels:
            c = cell(table, name, n)
            text = f"{c['aggregate_tokens_per_s']:.1f}"
            if name == best[n]:
                text = f"**{text}**"
            if c.get("gamma_histogram") and not name.startswith(("γ=", "TARGET")):
                text += f" (γ̄ {c['mean_gamma']:.1f})"
            out.append(text)
        rows.append(f"| {name} | " + " | ".join(out) + " |")
    return rows


def _controller_line(table: dict, name: str) -> str:
    parts = []
    for streams, c in sorted(table[name].items(), key=lambda kv: int(kv[0])):
        hist = c["gamma_histogram"]
        total = sum(hist) or 1
        shares = ", ".join(f"γ={g} {n / total:.0%}" for g, n in enumerate(hist) if n / total >= 0.05)
        parts.append(f"{streams} stream{'s' * (int(streams) > 1)}: {shares}; verifier batch "
                     f"{c['mean_batch_size'].get('verifier', 0):.2f}")
    return "The controller's γ per round (shares ≥ 5 %): " + "; ".join(parts) + "."


def plot_sweep(results: dict, path: Path) -> None:
    sweep = results["service"]["sweep"]
    fig, axes = plt.subplots(1, len(sweep), figsize=(6 * len(sweep), 4.5), squeeze=False)
    for ax, (kind, table) in zip(axes[0], sweep.items()):
        for name, cells in table.items():
            streams = sorted(cells, key=int)
            style = ("k-s" if name == "TARGET" else "r-o" if name == CONTROLLER
                     else "m--^" if "heuristic" in name else ":.")
            ax.plot([int(n) for n in streams], [cells[n]["aggregate_tokens_per_s"] for n in streams],
                    style, label=name, linewidth=2 if style[0] in "kr" else 1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(kind if kind == "greedy" else "sampled (T 0.8, top_p 0.95)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, levels in conc.items():
        streams = sorted(levels, key=int)
        ax.plot([int(s) for s in streams], [levels[s]["aggregate_tokens_per_s"] for s in streams],
                "o-", label=f"{mode} (greedy)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sampled(results: dict, path: Path) -> None:
    sampled = results["service"]["sampled"]
    names = list(sampled)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, [sampled[n]["tokens_per_s"] for n in names], color="tab:green")
    ax.axvline(results["derived"]["sampled_pipelined_bound"] * sampled["TARGET"]["tokens_per_s"],
               color="tab:red", linestyle="--")
    ax.set_xlabel("tokens/s, single stream, T 0.8 top_p 0.95 (red: pipelined bound)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _divergence_line(greedy: dict) -> str:
    parted = {name: g for name, g in greedy.items() if g["identical"] < g["outputs"]}
    total = sum(g["outputs"] for g in greedy.values())
    if not parted:
        return (f"Through the service, every greedy speculative and SD-end cascade configuration "
                f"printed exactly TARGET's tokens ({total} outputs).")
    firsts = [t for g in parted.values() for t in g["first_divergence_tokens"]]
    return (f"Greedy outputs equal to TARGET's: {total - len(firsts)} of {total}. The others part "
            f"from TARGET after {min(firsts)}–{max(firsts)} tokens (median "
            f"{sorted(firsts)[len(firsts) // 2]}) in {', '.join(parted)}. This is expected only in "
            "bf16, where logits depend slightly on the batch shape and a near-tie can flip; the "
            "exact-equality tests run in fp32/fp64.")


def write(results: dict, out_dir: Path, markdown: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_speed(results, out_dir / "speed.png")
    plot_sampled(results, out_dir / "sampled.png")
    plot_cascades(results, out_dir / "cascades.png")
    plot_concurrency(results, out_dir / "concurrency.png")
    plot_sweep(results, out_dir / "sweep.png")
    d, steps, host, svc = results["derived"], results["steps_ms"], results["host"], results["service"]
    rel = lambda p: Path(p).relative_to(markdown.parent) if markdown.parent in Path(p).parents else p  # noqa: E731
    cascades = svc["cascade"]
    dtypes = ", ".join(sorted({f"{r['role']} {r['dtype'] or 'float32'}" for r in results["replicas"]}))
    floor = results["rpc_floor_ms"]
    over = results["runner_overhead"]
    speed_cpu = {name: svc["speed"][name] for name in ("TARGET", "SPECULATIVE sequential",
                                                       "SPECULATIVE pipelined",
                                                       "SPECULATIVE always ahead")}
    sampled_cpu = {name: c for name, c in svc["sampled"].items()
                   if not name.endswith("SD end") or name.startswith("CASCADE DIFF")}
    gpu = out_dir / "gpu_check-cuda.md"  # written by `make gpu-check` on a lent GPU
    lines = [
        "# Benchmarks", "",
        f"Produced by `{COMMAND}` on {results['started']} ({os.cpu_count()} CPU cores, one torch "
        f"thread per replica). Host CPU: {host['model']}; native bf16: "
        f"{'yes (' + ', '.join(host['native_bf16_flags']) + ')' if host['native_bf16'] else 'no'}; "
        f"torch {host['torch']}. Replica dtypes (`dtype: auto`): {dtypes}. All numbers come from "
        f"one run; compare them as ratios. Raw data: `{rel(out_dir / 'results.json')}`.", "",
        "## Goals", "", "| issue | goal | measured | target | met |", "|---:|---|---:|---:|:-:|"]
    for name, (value, goal, op, issue) in d["goals"].items():
        met = value >= goal if op == "≥" else value <= goal
        lines.append(f"| {issue} | {name} | {value:.2f} | {op} {goal} | {'yes' if met else 'no'} |")
    lines += [
        "", f"Greedy: α = {d['alpha']:.3f} (from the pipelined run's mean accepted length); sampled "
        f"(T 0.8, top_p 0.95): α = {d['sampled_alpha']:.3f}. c = {d['cost_ratio_c']:.3f}; steps "
        f"(ms, in process): target {steps['target']:.1f}, draft {steps['draft']:.1f}, verify(γ+1) "
        f"{steps['verify']:.1f}. Bounds (REFERENCE.md §2): greedy sequential "
        f"{d['sequential_bound']:.2f}×, pipelined {d['pipelined_bound']:.2f}×; sampled pipelined "
        f"{d['sampled_pipelined_bound']:.2f}×. In process, HF target, our TARGET and SPECULATIVE "
        f"print the same greedy tokens: {results['in_process_greedy_equal']}. "
        + _divergence_line(svc["greedy_vs_target"]), "",
        "RPC floor in this run (median empty call, the transport the router uses): "
        + f"router → verifier {floor['router_to_verifier']:.2f} ms, raw Ray actor call {floor['raw_ray_actor']:.2f} ms"
        + ". Every round waits for at least one verifier call.", "",
        _profile_line(svc["router_profile"]), "",
        f"Runner cost outside the model forward, batch of {over['target']['batch']} (in process): "
        f"target {over['target']['runner_ms']:.1f} ms per call of which forward "
        f"{over['target']['forward_ms']:.1f} ms ({over['target']['outside_fraction']:.0%} outside); "
        f"draft {over['draft']['runner_ms']:.2f} ms, forward {over['draft']['forward_ms']:.2f} ms "
        f"({over['draft']['outside_fraction']:.0%} outside).", "",
        _draft_ahead_line({"greedy": svc["speed"], "sampled": svc["sampled"]}), "",
        "### What limits the goals not met (this run's numbers)", "", *explain(results), "",
        _noise_line(svc["speed"], results["plan"]["gamma"]), "",
        f"Adaptive γ against the best fixed γ ({d['best_fixed_gamma']}): "
        + ", ".join(f"{name} {ratio:.2f}×" for name, ratio in d["adaptive_over_best_fixed"].items())
        + ".", "",
        "## Speed through the gRPC service (single stream, greedy)", "",
        f"![speed]({rel(out_dir / 'speed.png')})", "", *_speed_table(svc["speed"]), "",
        "In process: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s"
                                   for k, v in results["in_process"].items()) + ".", "",
        "CPU time per round (ms, by process):", "", *_cpu_table(speed_cpu), "",
        "## Sampled decoding (temperature 0.8, top_p 0.95, single stream)", "",
        f"![sampled]({rel(out_dir / 'sampled.png')})", "", *_speed_table(svc["sampled"]), "",
        "CPU time per round (ms, by process):", "", *_cpu_table(sampled_cpu), "",
        "## Cascades: quality against latency", "",
        f"![cascades]({rel(out_dir / 'cascades.png')})", "",
        *_cascade_table(cascades, results["sequential_cascade"],
                        cascades["TARGET"]["latency_ms_mean"]), "",
        "## Speculation control: tokens/s against streams", "",
        "TARGET, fixed γ, transformers' +2/−1 heuristic (from γ=4) and the speculation controller "
        "(γ left unset: the default), through the service at each stream count, interleaved "
        "(bench/sweep.py). Bold: the best fixed γ of the column, the bar the controller is held to.",
        "", f"![sweep]({rel(out_dir / 'sweep.png')})", "",
        "Greedy:", "", *_sweep_table(svc["sweep"]["greedy"]), "",
        _controller_line(svc["sweep"]["greedy"], CONTROLLER), "",
        "Sampled (T 0.8, top_p 0.95):", "", *_sweep_table(svc["sweep"]["sampled"]), "",
        _controller_line(svc["sweep"]["sampled"], CONTROLLER), "",
        "## Concurrency", "", f"![concurrency]({rel(out_dir / 'concurrency.png')})", "",
        *_concurrency_table(svc["concurrency"]), "",
        "CPU time per round of greedy SPECULATIVE (ms, all cores, by process) and how busy the "
        "cores were:", "",
        *_cpu_table({f"{n} streams": c for n, c in sorted(svc["concurrency"]["SPECULATIVE"].items(),
                                                          key=lambda kv: int(kv[0]))}, busy=True), "",
        *_frontier(markdown, out_dir),
        "## GPU", "",
        gpu.read_text().strip() if gpu.exists() else
        "No GPU was lent for this run. `make gpu-check` runs the runner and service tests on CUDA "
        "in bf16 and writes the timing table that belongs here."]
    markdown.write_text("\n".join(lines) + "\n")
