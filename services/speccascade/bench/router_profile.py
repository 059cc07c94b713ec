"""Single-stream greedy SPECULATIVE load on the default pair: CPU per round of this cluster's router,
drafter and verifier replicas, and optionally a py-spy profile of the router.

    python -m speccascade.bench.router_profile [--seconds 15] [--waste-cost F] [--py-spy OUT.raw]

CPU comes from /proc/<pid>/stat of the replicas named by the Stats RPC (other Ray clusters on the
machine carry the same process titles). The load is one loopback stream, bounded in time.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time

from speccascade.bench import profile
from speccascade.bench.measure import stream_one
from speccascade.client import SpecCascadeClient
from speccascade.serve import launch
from speccascade.serve.config import ServiceConfig

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser("


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--waste-cost", type=float, default=None)
    parser.add_argument("--py-spy", default=None, help="also record the router to this raw file")
    args = parser.parse_args()
    fields = {"grpc_port": _free_port(), "http_port": _free_port(),
              "draft_ahead_waste_cost": args.waste_cost}
    config = ServiceConfig.load({k: v for k, v in fields.items() if v is not None})
    kw = dict(mode="speculative", max_new_tokens=96, num_draft_tokens=4)
    try:
        client = SpecCascadeClient(launch.start(config, num_cpus=2), timeout=120)
        stats = client.stats()
        pids = {"router": stats.router_pid, **{r.role: r.pid for r in stats.replicas}}
        for _ in range(3):  # warm up
            stream_one(client, PROMPT, **kw)

        def load(seconds: float):
            runs, started = [], time.time()
            while time.time() - started < seconds:
                runs.append(stream_one(client, PROMPT, **kw))
            return runs, time.time() - started

        before = _cpu_seconds(pids)
        runs, elapsed = load(args.seconds)
        after = _cpu_seconds(pids)
        rounds = sum(r.stats["rounds"] for r in runs)
        result = {
            "rounds": rounds, "rounds_per_s": rounds / elapsed,
            "tokens_per_s": sum(len(r.token_ids) for r in runs) / elapsed,
            "cpu_ms_per_round": {k: (after[k] - before[k]) * 1000 / rounds for k in pids},
            "accepted_per_round": sum(r.stats["accepted"] for r in runs) / rounds,
            "drafted_ahead_per_round": sum(r.stats["drafted_ahead"] for r in runs) / rounds,
            "discarded_draft_tokens_per_round":
                sum(r.stats["discarded_draft_tokens"] for r in runs) / rounds,
            "draft_ahead_waste_cost": config.draft_ahead_waste_cost}
        if args.py_spy:
            result["router_profile"] = profile.record(pids["router"], args.seconds, load,
                                                      raw_out=args.py_spy)
        print(json.dumps(result, indent=1))
        client.close()
    finally:
        launch.stop()


if __name__ == "__main__":
    main()
