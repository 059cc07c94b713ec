"""BENCHMARKS.md and the PNG plots from a results dict (see bench/run.py)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from speccascade.bench import transports  # noqa: E402
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


def _profile_line(p: dict) -> str:
    shares = ", ".join(f"{name} {share:.0%}" for name, share in p["self_share"].items())
    return (f"Router profile (py-spy, {p['samples']} samples at {p['rate_hz']} Hz over "
            f"{p['seconds']:g} s of single-stream greedy SPECULATIVE; each sample charged to the "
            f"library of its innermost Python frame): {shares}. speccascade's code is on the stack "
            f"in {p['speccascade_on_stack']:.0%} of samples.")


def _transports_table(tables: dict[str, dict]) -> list[str]:
    """tokens/s and verifier (drafter) rows per forward by stream count and configuration, one
    column pair per transport."""
    kinds = list(tables)
    names = list(next(iter(tables.values())))
    levels = sorted({int(k) for t in tables.values() for cells in t.values() for k in cells})
    rows = ["| streams | configuration | " + " | ".join(
        f"{k} tok/s | {k} rows/forward: verifier / drafter" for k in kinds) + " |",
        "|---:|---|" + "---:|---:|" * len(kinds)]
    for n in levels:
        for name in names:
            out = []
            for k in kinds:
                try:
                    c = cell(tables[k], name, n)
                except KeyError:
                    out.append("– | –")
                    continue
                b = c["mean_batch_size"]
                drafter = f"{b['drafter']:.2f}" if b.get("drafter") else "–"
                out.append(f"{c['aggregate_tokens_per_s']:.1f} | {b.get('verifier', 0):.2f} / {drafter}")
            label = "SPECULATIVE " + name if name.startswith("γ=") else name
            rows.append(f"| {n} | {label} | " + " | ".join(out) + " |")
    return rows


def _round_line(s: dict, label: str) -> str:
    return (f"{label}: a round {s['round_ms']:.1f} ms for {s['mean_accepted_length']:.2f} tokens "
            f"(verify {s['round_verify_ms']:.1f}, draft {s['round_draft_ms']:.1f} of which hidden "
            f"{s['round_hidden_draft_ms']:.1f}, other {other_ms(s):.1f}); median non-model time per "
            f"round {s['non_model_ms_per_round_p50']:.1f} ms; acceptance {s['acceptance_rate']:.2f}")


def _hop_line(results: dict) -> str:
    hop = results["hop"]
    idle, load = hop["idle"], hop["under_load"]
    line = (f"Data-path hop (an empty ping router → engine → router over {idle['path']}, timed in "
            f"the router, {idle['calls']} calls): idle p50 {idle['router_to_verifier']:.2f} ms, p99 "
            f"{idle['p99_ms']:.2f} ms; under {load['streams']} TARGET streams "
            f"({load['load_tokens_per_s']:.1f} tok/s) "
            f"p50 {load['router_to_verifier']:.2f} ms, p99 {load['p99_ms']:.2f} ms. An empty Serve "
            f"call router → verifier replica: {idle['serve_call_median_ms']:.2f} ms idle, "
            f"{load['serve_call_median_ms']:.2f} ms under load")
    if "raw_ray_actor" in idle:
        line += f"; a raw Ray actor call from the driver {idle['raw_ray_actor']:.2f} ms"
    tcp = (results.get("tcp") or {}).get("hop")
    if tcp:
        line += (f". On tcp ({tcp['path']}): p50 {tcp['router_to_verifier']:.2f} ms, p99 "
                 f"{tcp['p99_ms']:.2f} ms")
    return line + "."


def plot_transports(results: dict, path: Path) -> None:
    tables = transports.table(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for kind, table in tables.items():
        for name, cells in table.items():
            streams = sorted(cells, key=int)
            color = colors.setdefault(name, f"C{len(colors)}")
            ax.plot([int(n) for n in streams], [cells[n]["aggregate_tokens_per_s"] for n in streams],
                    "o-" if kind == "ipc" else "s--", color=color, label=f"{name} ({kind})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams (greedy)")
    ax.set_ylabel("aggregate tokens/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path, markdown: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_transports(results, out_dir / "transports.png")
    plot_sweep(results, out_dir / "sweep.png")
    d, steps, host, svc = results["derived"], results["steps_ms"], results["host"], results["service"]
    plan = results["plan"]
    rel = lambda p: Path(p).relative_to(markdown.parent) if markdown.parent in Path(p).parents else p  # noqa: E731
    dtypes = ", ".join(sorted({f"{r['role']} {r['dtype'] or 'float32'}" for r in results["replicas"]}))
    greedy, sampled = svc["sweep"]["greedy"], svc["sweep"]["sampled"]
    spec = f"γ={plan['gamma']}"
    levels = sorted({int(k) for k in greedy["TARGET"]})
    cpu_columns = {f"TARGET, {n}": cell(greedy, "TARGET", n) for n in levels}
    cpu_columns.update({f"SPECULATIVE {spec}, {n}": cell(greedy, spec, n) for n in levels})
    tcp = results.get("tcp")
    if tcp:
        top = max(levels)
        cpu_columns[f"SPECULATIVE {spec}, {top}, tcp"] = cell(tcp["cells"], spec, top)
    gpu = out_dir / "gpu_check-cuda.md"  # written by `make gpu-check` on a lent GPU
    stages = results.get("stage_s", {})
    lines = [
        "# Benchmarks", "",
        f"Produced by `{COMMAND}` on {results['started']} ({os.cpu_count()} CPU cores, one torch "
        f"thread per engine). Host CPU: {host['model']}; native bf16: "
        f"{'yes (' + ', '.join(host['native_bf16_flags']) + ')' if host['native_bf16'] else 'no'}; "
        f"torch {host['torch']}. Engine dtypes (`dtype: auto`): {dtypes}. {plan['prompts']} "
        f"held-out prompts, {plan['new_tokens']} new tokens each; SPECULATIVE is fixed γ = "
        f"{plan['gamma']} unless named. All numbers come from one run; compare them as ratios. Raw "
        f"data: `{rel(out_dir / 'results.json')}`"
        + (" (stages, min: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in stages.items()) + ")"
           if stages else "") + ".", "",
        "## Goals", "", "| issue | goal | measured | target | met |", "|---:|---|---:|---:|:-:|"]
    for name, (value, goal, op, issue) in d["goals"].items():
        met = value >= goal if op == "≥" else value <= goal
        lines.append(f"| {issue} | {name} | {value:.2f} | {op} {goal} | {'yes' if met else 'no'} |")
    lines += [
        "", f"Steps in process (ms, one thread): target {steps['target']:.1f}, draft "
        f"{steps['draft']:.1f}, verify(γ+1) {steps['verify']:.1f}. In process, single stream: "
        + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in results["in_process"].items())
        + f"; TARGET and SPECULATIVE print the same greedy tokens: "
        f"{results['in_process_greedy_equal']}. " + _divergence_line(d["greedy_vs_target"]), "",
        _round_line(cell(greedy, spec, 1), f"Greedy SPECULATIVE ({spec}), 1 stream") + ". "
        + _round_line(cell(sampled, spec, 1), "Sampled (T 0.8, top_p 0.95)") + ".", "",
        _hop_line(results), "",
        _profile_line(svc["router_profile"]), "",
        "### What limits the goals not met (this run's numbers)", "", *explain(results), "",
        "## Concurrency and transports (greedy)", "",
        "Aggregate tokens/s and the engines' mean rows per forward (rows over forwards in the "
        "cell) at each stream count, on the default ipc:// data path (the sweep's cells) and on tcp "
        "(a second launch with `transport.prefer_ipc: false`, measured once; bench/transports.py).",
        "", f"![transports]({rel(out_dir / 'transports.png')})", "",
        *_transports_table(transports.table(results)), "",
        "## CPU per round by process", "",
        "CPU ms per round on all cores, by process (greedy; columns: configuration, streams), and "
        "how busy the two cores were. Drafter/Verifier are the Serve replicas' front ends, "
        "\"drafter engine\"/\"verifier engine\" the model processes, ProxyActor Serve's proxy, "
        "client the benchmark's own gRPC client.", "",
        *_cpu_table(cpu_columns, busy=True), "",
        "## Speculation control: tokens/s against streams", "",
        "TARGET, fixed γ and the speculation controller (γ left unset: the default), through the "
        "service at each stream count, interleaved (bench/sweep.py). Bold: the best fixed γ of the "
        "column, the bar the controller is held to.",
        "", f"![sweep]({rel(out_dir / 'sweep.png')})", "",
        "Greedy:", "", *_sweep_table(greedy), "", _controller_line(greedy, CONTROLLER), "",
        "Sampled (T 0.8, top_p 0.95):", "", *_sweep_table(sampled), "",
        _controller_line(sampled, CONTROLLER), "",
        *_frontier(markdown, out_dir),
        "## GPU", "",
        gpu.read_text().strip() if gpu.exists() else
        "No GPU was lent for this run. `make gpu-check` runs the runner and service tests on CUDA "
        "in bf16 and writes the timing table that belongs here."]
    markdown.write_text("\n".join(lines) + "\n")
