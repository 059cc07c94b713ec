"""`speccascade bench` subcommand."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: JSON, BENCHMARKS.md and PNG plots")
    parser.add_argument("--quick", action="store_true", help="smoke run (minutes, tiny counts)")
    parser.add_argument("--out", default=None, help="folder for results.json and plots "
                        "(default: benchmarks/, or a temp folder with --quick)")
    parser.add_argument("--markdown", default=None, help="default: BENCHMARKS.md (full run)")
    parser.add_argument("--grpc-port", type=int, default=9123)
    parser.add_argument("--target", default=None, help="local checkpoint (default: embedded pair)")
    parser.add_argument("--draft", default=None, help="local checkpoint (default: embedded pair)")
    parser.add_argument("--dtype", default=None, help="both models (default: the config's, auto); "
                        "float32 makes greedy equality exact")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> None:
    import tempfile
    from dataclasses import replace

    from speccascade.bench.report import write
    from speccascade.bench.run import BenchPlan, run_bench

    plan = replace(BenchPlan.quick() if args.quick else BenchPlan(), grpc_port=args.grpc_port,
                   target=args.target, draft=args.draft, dtype=args.dtype)
    scratch = Path(tempfile.mkdtemp(prefix="speccascade-bench-")) if args.quick else None
    out = Path(args.out) if args.out else (scratch or Path("benchmarks"))
    markdown = Path(args.markdown) if args.markdown else (out / "BENCHMARKS.md" if args.quick
                                                          else Path("BENCHMARKS.md"))
    results = run_bench(plan, out)
    write(results, out, markdown)
    print(f"wrote {out / 'results.json'}, {markdown} and plots in {out}")
    for name, (value, goal, op, issue) in results["derived"]["goals"].items():
        print(f"  issue {issue}: {name}: {value:.2f} (goal {op} {goal})")
