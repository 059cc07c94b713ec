"""`speccascade` command line: models, in-process generation, the service and its client, benchmarks."""
from __future__ import annotations

import argparse
import sys

from speccascade.models.loader import default_pair_paths

MODES = ["target", "draft", "speculative", "cascade"]
RULES = ["chow", "diff", "opt", "token_v1", "token_v2", "token_v3"]
PIPELINE = {"auto": None, "always": True, "never": False}  # GenerationRequest.pipelined


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Request options shared by `generate` (in process) and `client` (over gRPC)."""
    parser.add_argument("prompt")
    parser.add_argument("--mode", choices=MODES, default="speculative")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=0,
                        help="γ, tokens drafted per round; 0 (default) = the speculation "
                        "controller picks γ every round from measured acceptance, costs and load")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="target/speculative: min-p truncation of the target, keep tokens with "
                        "p >= MIN_P * max p (verified losslessly); in [0, 1), 0 = off; sampled only")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="target/speculative: eta-sampling of the target (Hewitt et al. 2022), "
                        "keep p >= min(eta, sqrt(eta) * exp(-entropy)); in [0, 1), 0 = off")
    parser.add_argument("--lenience", type=float, default=None,
                        help="speculative only: lossy speculative decoding, accept a draft with "
                        "min(1, p / (LENIENCE * q)); in (0, 1], default 1 = lossless; sampled only. "
                        "Compare with cascades: README 'Choosing α'")
    parser.add_argument("--rule", choices=RULES, default="chow", help="cascade deferral rule")
    parser.add_argument("--alpha", type=float, default=None,
                        help="cascade deferral threshold α, deferral_threshold (default: the rule's "
                        "SD end); README 'Choosing α' lists per rule the α that keeps quality "
                        "within 1 %% of TARGET")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--pipeline", choices=PIPELINE, default="auto",
                        help="draft block k+1 while block k is verified: auto = when the running "
                        "acceptance says it pays, always, or never (draft and verify in turn)")


def _generate(args) -> None:
    import random

    import torch

    from speccascade.engine.engine import Engine
    from speccascade.engine.loop import Mode
    from speccascade.sampling import SD_END, CascadeParams, DeferralRule, SamplingParams

    torch.set_num_threads(args.threads)
    engine = Engine.from_paths(args.target, args.draft, dtype=args.dtype, device=args.device)
    rule = DeferralRule[args.rule.upper()]
    try:
        cascade = CascadeParams(rule, SD_END[rule] if args.alpha is None else args.alpha)
        request = engine.request(
            args.prompt, mode=Mode[args.mode.upper()], max_new_tokens=args.max_new_tokens,
            num_draft_tokens=args.num_draft_tokens or None,
            sampling=SamplingParams(args.temperature, args.top_k, args.top_p,
                                    random.getrandbits(63) if args.seed is None else args.seed,
                                    min_p=args.min_p, eta=args.eta,
                                    lenience=1.0 if args.lenience is None else args.lenience),
            cascade=cascade if args.mode == "cascade" else None, stop=tuple(args.stop),
            pipelined=PIPELINE[args.pipeline])
    except ValueError as error:  # bad request options: say which, without a traceback
        sys.exit(f"speccascade generate: {error}")
    [result] = engine.generate([request])
    s = result.stats
    print(args.prompt + result.text)
    print(f"\n-- {args.mode}: {len(result.token_ids)} tokens in {s.total_ms:.0f} ms "
          f"({1000 * len(result.token_ids) / max(s.total_ms, 1e-9):.1f} tok/s), finish={result.finish_reason}, "
          f"rounds={s.rounds} drafted={s.drafted} accepted={s.accepted} "
          f"mean_accepted_length={s.mean_accepted_length:.2f} deferrals={s.deferrals} "
          f"draft_ms={s.draft_ms:.0f} verify_ms={s.verify_ms:.0f} overlap={s.overlap_fraction:.2f} "
          f"mean_gamma={s.mean_gamma:.2f} gamma_histogram={s.gamma_histogram}",
          file=sys.stderr)


def _models_build(args) -> None:
    from speccascade.models.build import cli_build

    cli_build(args)


def _models_eval(args) -> None:
    from speccascade.models.evaluate import main

    main(args)


def _add_pair_args(parser: argparse.ArgumentParser) -> None:
    target, draft = default_pair_paths()
    parser.add_argument("--target", default=str(target), help="local HF checkpoint (default: embedded)")
    parser.add_argument("--draft", default=str(draft), help="local HF checkpoint (default: embedded)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"],
                        help="auto (default): bf16 where measured faster on a native-bf16 device, else fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speccascade", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="build or measure the default draft/target pair")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="distill the default draft from the target (resumable; ≈70 min at 2 threads)")
    build.add_argument("--out", default=str(default_pair_paths()[1].parent))
    build.add_argument("--quick", action="store_true")
    build.add_argument("--threads", type=int, default=1,
                       help="torch threads (the same machine and count give the same draft)")
    build.add_argument("--steps", type=int, default=None,
                       help="training steps (default 600); a resumed build continues on the new schedule")
    build.add_argument("--from-stage", default=None, choices=("generate", "rank", "shape", "draft", "head"),
                       help="redo this stage and the later ones (default: resume unfinished work)")
    build.set_defaults(func=_models_build)
    evaluate = models_sub.add_parser("eval", help="losses, line completion, acceptance, step costs")
    _add_pair_args(evaluate)
    evaluate.add_argument("--tasks", type=int, default=2000, help="line-completion tasks")
    evaluate.add_argument("--out", default=None, help="write the JSON card here")
    evaluate.set_defaults(func=_models_eval)

    generate = sub.add_parser("generate", help="generate in process (no Ray)")
    add_sampling_args(generate)
    _add_pair_args(generate)
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(func=_generate)

    # The service, its client and the benchmarks register their own subcommands.
    from speccascade.bench.cli import add_bench_parser
    from speccascade.serve.cli import add_client_parser, add_serve_parser

    for adder in (add_serve_parser, add_client_parser, add_bench_parser):
        adder(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
