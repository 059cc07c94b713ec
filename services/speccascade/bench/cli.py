"""`speccascade bench` subcommand."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: JSON, BENCHMARKS.md and PNG plots")
    parser.add_argument("--quick", action="store_true", help="smoke run (minutes, tiny counts); "
                        "prints the full plan's estimated stage times on this pair and host")
    parser.add_argument("--out", default=None, help="folder for results.json and plots "
                        "(default: benchmarks/, or a temp folder with --quick)")
    parser.add_argument("--markdown", default=None, help="default: BENCHMARKS.md (full run)")
    parser.add_argument("--sweep-repeats", type=int, default=None, help="interleaved repeats of "
                        "each sweep cell in rotated order (default 1; 2 doubles the sweep, most of "
                        "the run, for less noise)")
    parser.add_argument("--no-tcp", action="store_true", help="skip the second launch on tcp")
    parser.add_argument("--grpc-port", type=int, default=9123)
    parser.add_argument("--http-port", type=int, default=8123, help="Serve's HTTP proxy")
    parser.add_argument("--target", default=None, help="local checkpoint (default: the default pair)")
    parser.add_argument("--draft", default=None, help="local checkpoint (default: the default pair)")
    parser.add_argument("--dtype", default=None, help="both models (default: the config's, auto); "
                        "float32 makes greedy equality exact")
    parser.set_defaults(func=_bench)
    sub = parser.add_subparsers(dest="bench_command")  # optional: plain `bench` is the full run
    frontier = sub.add_parser("frontier", help="quality–latency frontier of the cascades against "
                              "lossy SD (lenience) and truncation + SD, with paired bootstrap CIs "
                              "(bench/frontier.py; --pilot sizes it, --estimate-only times it); "
                              "README \"Choosing α\" comes from it")
    frontier.add_argument("--quick", action="store_true", help="a handful of tasks and α (CI)")
    frontier.add_argument("--estimate-only", action="store_true",
                          help="time a small sample, print the full plan's estimate, and stop")
    frontier.add_argument("--pilot", action="store_true", help="TARGET vs DRAFT and vs itself "
                          "reseeded on a few tasks (in process): per metric, the tasks a 0.5 %% "
                          "CI half-width of the relative loss needs (--tasks: pilot size, "
                          "default 100 per family)")
    frontier.add_argument("--results", default=None, help="re-render the markdown, plots and "
                          "choosing_alpha.md from this frontier.json (measures nothing)")
    frontier.add_argument("--readme", default=None, help="also fill this README's \"Choosing α\" "
                          "table (between its choosing-alpha markers)")
    frontier.add_argument("--out", default=None, help="folder for frontier.json and plots "
                          "(default: benchmarks/, or a temp folder with --quick, --estimate-only "
                          "or --pilot)")
    frontier.add_argument("--markdown", default=None, help="default: <out>/frontier.md")
    frontier.add_argument("--tasks", type=int, default=None, help="tasks per family")
    frontier.add_argument("--families", default=None,
                          help="comma-separated task families (default: code,facts)")
    frontier.add_argument("--alphas-per-rule", type=int, default=None)
    frontier.add_argument("--streams", type=int, default=None,
                          help="concurrent quality streams through the service")
    frontier.add_argument("--quality-on", choices=("engine", "service"), default=None,
                          help="where the quality pass runs: in process, batched, with a service "
                          "check on the first tasks (default), or all of it through the service")
    frontier.add_argument("--full-length", action="store_true", help="read every quality stream "
                          "to its end instead of cancelling it at the line's end (same metrics, "
                          "about 2.5x the tokens)")
    frontier.add_argument("--grpc-port", type=int, default=9124)
    frontier.add_argument("--http-port", type=int, default=8124, help="Serve's HTTP proxy")
    frontier.add_argument("--target", default=None, help="local checkpoint (default: embedded pair)")
    frontier.add_argument("--draft", default=None, help="local checkpoint (default: embedded pair)")
    frontier.add_argument("--dtype", default=None, help="service replicas (default: the config's)")
    frontier.set_defaults(func=_frontier)
    report = sub.add_parser("report", help="re-render the markdown and plots from a results.json "
                            "(measures nothing)")
    report.add_argument("--results", default="benchmarks/results.json")
    report.add_argument("--markdown", default="BENCHMARKS.md")
    report.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> None:
    import json

    from speccascade.bench.report import write

    results = Path(args.results)
    write(json.loads(results.read_text()), results.parent, Path(args.markdown))
    print(f"wrote {args.markdown} and plots in {results.parent} from {results}")


def _bench(args: argparse.Namespace) -> None:
    import tempfile
    from dataclasses import replace

    from speccascade.bench.report import write
    from speccascade.bench.run import BenchPlan, run_bench

    plan = replace(BenchPlan.quick() if args.quick else BenchPlan(), grpc_port=args.grpc_port,
                   http_port=args.http_port, target=args.target, draft=args.draft, dtype=args.dtype)
    if args.sweep_repeats:
        plan = replace(plan, sweep_repeats=args.sweep_repeats)
    if args.no_tcp:
        plan = replace(plan, tcp=False)
    scratch = Path(tempfile.mkdtemp(prefix="speccascade-bench-")) if args.quick else None
    out = Path(args.out) if args.out else (scratch or Path("benchmarks"))
    markdown = Path(args.markdown) if args.markdown else (out / "BENCHMARKS.md" if args.quick
                                                          else Path("BENCHMARKS.md"))
    results = run_bench(plan, out)
    write(results, out, markdown)
    print(f"wrote {out / 'results.json'}, {markdown} and plots in {out}")
    for name, (value, goal, op, issue) in results["derived"]["goals"].items():
        print(f"  issue {issue}: {name}: {value:.2f} (goal {op} {goal})")
    est = results["estimate_full_s"]
    print(f"stages (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in results["stage_s"].items()))
    if args.quick:
        print(f"estimated full run: {est['total_s'] / 60:.1f} min (" + ", ".join(
            f"{k} {v / 60:.1f}" for k, v in est.items() if k != "total_s") + ")")


def _frontier(args: argparse.Namespace) -> None:
    import json
    import tempfile
    from dataclasses import replace

    from speccascade.bench import frontier as fr
    from speccascade.bench import frontier_report as rep

    if args.results:
        results = json.loads(Path(args.results).read_text())
        out = Path(args.results).parent
        _frontier_outputs(results, out, Path(args.markdown) if args.markdown else out / "frontier.md",
                          args.readme)
        return
    given = {k: v for k, v in (("tasks", args.tasks), ("alphas_per_rule", args.alphas_per_rule),
                               ("streams", args.streams), ("quality_on", args.quality_on))
             if v is not None}
    if args.families:
        given["families"] = tuple(f.strip() for f in args.families.split(",") if f.strip())
    common = dict(grpc_port=args.grpc_port, http_port=args.http_port, target=args.target,
                  draft=args.draft, dtype=args.dtype, stop_at_line_end=not args.full_length)
    full = replace(fr.FrontierPlan(), **given, **common)
    scratch = args.quick or args.estimate_only or args.pilot
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="speccascade-frontier-")) if scratch else Path("benchmarks"))
    if args.pilot:
        plan = replace(full, tasks=args.tasks or 100)
        full = replace(full, tasks=fr.FrontierPlan().tasks)
        pilot = fr.run_pilot(plan, out, full)
        table = rep.pilot_table(pilot)
        (out / "pilot.md").write_text("\n".join(table) + "\n")
        print("\n".join(table))
        print(f"wrote {out / 'pilot.json'} and {out / 'pilot.md'}")
        return
    if args.estimate_only:  # a sample of the full plan: few tasks, one value per grid
        plan = full.sample()
    elif args.quick:
        plan = replace(fr.FrontierPlan.quick(), **given, **common)
    else:
        plan = full
    results = fr.run_frontier(plan, out, estimate_for=full)
    est = results["estimate_full_run_s"]
    n = sum(len(fr.configs(full, s)) for s in (False, True))
    print(f"estimated full run ({full.tasks} tasks × {len(full.families)} families, {n} quality "
          f"configurations, {full.alphas_per_rule} α per rule): {est['total_s'] / 60:.1f} min ("
          + ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in est.items() if k != "total_s") + ")")
    if args.estimate_only:
        return
    _frontier_outputs(results, out, Path(args.markdown) if args.markdown else out / "frontier.md",
                      args.readme)
    for decoding, a in results["analysis"].items():
        print(f"  {decoding}: metrics whose DRAFT − TARGET CI excludes 0: "
              f"{', '.join(a['separating_metrics']) or 'none'}")


def _frontier_outputs(results: dict, out: Path, markdown: Path, readme: str | None) -> None:
    from speccascade.bench.frontier_report import choosing_alpha, fill_readme, write

    write(results, out, markdown)
    print(f"wrote {out / 'frontier.json'}, {markdown}, {out / 'choosing_alpha.md'} and "
          f"frontier_*.png in {out}")
    if readme:
        filled = fill_readme(Path(readme), choosing_alpha(results))
        print(f"{'filled' if filled else 'no choosing-alpha markers in'} {readme}")
