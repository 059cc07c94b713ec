"""`speccascade serve` and `speccascade client` (registered by speccascade.cli)."""
from __future__ import annotations

import argparse
import signal
import sys
import time


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the gRPC and HTTP service on a local Ray (Ctrl-C stops it)",
        description="Start a local Ray (no dashboard) and the speccascade application; print the "
                    "gRPC and the OpenAI-compatible HTTP address when ready; shut everything "
                    "down on Ctrl-C or SIGTERM.")
    parser.add_argument("--config", help="ServiceConfig YAML (its fields, or a Serve config's "
                        "application args, e.g. deploy/serve.yaml)")
    parser.add_argument("--grpc-port", type=int, default=None, help="default 9000")
    parser.add_argument("--http-port", type=int, default=None,
                        help="the OpenAI-compatible HTTP API; default 8000")
    parser.add_argument("--host", default=None, help="default 127.0.0.1 (loopback clients only)")
    parser.add_argument("--num-cpus", type=float, default=None,
                        help="logical CPUs for Ray (default: detected)")
    parser.set_defaults(func=_serve)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _on_stop_signals() -> None:
    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then leaves it ignored.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_interrupt)


def _serve(args) -> None:
    from speccascade.serve import launch
    from speccascade.serve.config import ServiceConfig

    config = ServiceConfig.load(args.config, grpc_port=args.grpc_port, http_port=args.http_port,
                                host=args.host)
    _on_stop_signals()  # `kill` stops it as cleanly as Ctrl-C
    try:
        launch.start(config, num_cpus=args.num_cpus)
        _on_stop_signals()  # again: ray.init installs its own
        address, url = launch.addresses(config)
        target, draft = config.model_paths()
        print(f"speccascade ready: gRPC at {address}, OpenAI-compatible HTTP at {url} "
              f"(target {target}, draft {draft})\n"
              f"  try: speccascade client 'def fib(n):' --address {address} --stream\n"
              f"       curl {url}/completions -H 'Content-Type: application/json' "
              f"-d '{{\"prompt\": \"def fib(n):\", \"max_tokens\": 32}}'", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("speccascade: shutting down", file=sys.stderr, flush=True)
    finally:
        launch.stop()


def add_client_parser(subparsers) -> None:
    from speccascade.cli import add_sampling_args

    parser = subparsers.add_parser("client", help="call a running service over gRPC")
    add_sampling_args(parser)
    parser.add_argument("--address", default="127.0.0.1:9000")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--timeout", type=float, default=300.0, help="gRPC deadline, seconds")
    parser.set_defaults(func=_client)


def _client(args) -> None:
    import grpc

    from speccascade.cli import PIPELINE
    from speccascade.client import SpecCascadeClient
    from speccascade.sampling import SD_END, DeferralRule

    fields = dict(max_new_tokens=args.max_new_tokens, mode=args.mode,
                  num_draft_tokens=args.num_draft_tokens, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                  pipelined=PIPELINE[args.pipeline], min_p=args.min_p, eta=args.eta,
                  lenience=args.lenience)
    if args.mode == "cascade":
        rule = DeferralRule[args.rule.upper()]
        fields.update(deferral_rule=rule.name,
                      deferral_threshold=SD_END[rule] if args.alpha is None else args.alpha)
    with SpecCascadeClient(args.address, timeout=args.timeout) as client:
        try:
            print(args.prompt, end="", flush=True)
            if args.stream:
                stats = None
                for part in client.generate_stream(args.prompt, **fields):
                    print(part.text, end="", flush=True)
                    stats = part.stats if part.HasField("stats") else stats
            else:
                reply = client.generate(args.prompt, **fields)
                print(reply.text, end="")
                stats = reply.stats
            print()
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            sys.exit(1)
    s = stats
    print(f"-- {args.mode}: rounds={s.rounds} drafted={s.drafted} accepted={s.accepted} "
          f"mean_accepted_length={s.mean_accepted_length:.2f} deferrals={s.deferrals} "
          f"ttft={s.ttft_ms:.0f} ms total={s.total_ms:.0f} ms draft={s.draft_ms:.0f} ms "
          f"verify={s.verify_ms:.0f} ms overlap={s.overlap_fraction:.2f}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:  # `python -m speccascade.serve.cli`
    parser = argparse.ArgumentParser(prog="speccascade")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    add_client_parser(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
