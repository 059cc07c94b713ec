"""Runner profile: the slab runner beside another runner module (e.g. main's), one thread.

    PYTHONPATH=services python benchmarks/kv_profile.py [--old /work/main/services/speccascade/models/runner.py]
        [--dtype float32|bfloat16] [--device cpu|cuda] [--rounds 30]

Workload per forward, as a speculative round does: every row feeds γ + 1 = 5 tokens (a
verification) or 1 token (a draft/target step), and every other round rolls back 2 tokens first.
Prints per forward (medians, and the fastest): wall time of `runner.forward`, the time inside
`model.forward`, and the share outside it, for B = 1 and B = 8; and the aggregate B=8 / B=1
tokens/s (8 rows per forward against 1).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from speccascade.models.loader import default_pair_paths, load_model


def _module(path):
    spec = importlib.util.spec_from_file_location(f"runner_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _Probe:
    """One runner on its own copy of the model, timing its model.forward calls."""

    def __init__(self, runner_cls, path, dtype, device, batch, new, sync):
        self.model = load_model(path, dtype, device)
        self.runner = runner_cls(self.model, max_live_seqs=16)
        self.batch, self.new, self.sync = batch, new, sync
        self.walls, self.inner = [], []
        forward = self.model.forward

        def timed(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            sync()
            self.inner.append(time.perf_counter() - t0)
            return out

        gen = self.gen = torch.Generator().manual_seed(0)
        self.seqs = {f"s{b}": torch.randint(0, 1000, (PROMPT,), generator=gen).tolist()
                     for b in range(batch)}
        self.runner.forward([(k, v, 1) for k, v in self.seqs.items()])
        self.model.forward = timed
        self.step = 0

    def round(self):
        for k in self.seqs:  # every other round rejects 2 tokens: a rollback
            if self.step % 2:
                self.seqs[k] = self.seqs[k][:-2]
            self.seqs[k] = self.seqs[k] + torch.randint(0, 1000, (self.new,),
                                                        generator=self.gen).tolist()
        self.step += 1
        if sum(map(len, self.seqs.values())) > self.batch * (PROMPT + 96):  # stay in the context
            for k in self.seqs:
                self.seqs[k] = self.seqs[k][:PROMPT]
        self.sync()
        t0 = time.perf_counter()
        self.runner.forward([(k, v, self.new) for k, v in self.seqs.items()])
        self.sync()
        self.walls.append(time.perf_counter() - t0)

    def result(self, skip=3):
        """(median forward ms, median model ms, median ms outside the model, min forward ms);
        the min is the steadiest figure on a busy host."""
        walls, inner = self.walls[skip:], self.inner[skip:]  # one model call per forward
        return (statistics.median(walls) * 1000, statistics.median(inner) * 1000,
                statistics.median(w - m for w, m in zip(walls, inner)) * 1000, min(walls) * 1000)


PROMPT = 128


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default="/work/main/services/speccascade/models/runner.py")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from speccascade.models import runner as new_runner

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    runners = {"slab": new_runner.ModelRunner}
    if args.old:
        runners["old"] = _module(args.old).ModelRunner
    target_dir, draft_dir = default_pair_paths()
    print("| model | dtype | runner | new tokens | B | forward ms | min ms | model ms | outside % "
          "| B=8/B=1 tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path in [("target", target_dir), ("draft", draft_dir)]:
        for new in (5, 1):
            probes = {(label, batch): _Probe(cls, path, args.dtype, args.device, batch, new, sync)
                      for label, cls in runners.items() for batch in (1, 8)}
            for _ in range(args.rounds):  # interleaved: a busy host slows every runner alike
                for probe in probes.values():
                    probe.round()
            for (label, batch), probe in probes.items():
                wall, model_ms, outside, fastest = probe.result()
                speed = ""
                if batch == 8:
                    speed = f"{(8 / wall) / (1 / probes[label, 1].result()[0]):.2f}x"
                print(f"| {name} | {args.dtype} | {label} | {new} | {batch} | {wall:.2f} | "
                      f"{fastest:.2f} | {model_ms:.2f} | {100 * outside / model_ms:.1f} | "
                      f"{speed} |", flush=True)


if __name__ == "__main__":
    main()
