"""What the benchmark host is, and what the runner costs outside the model: in process, no Ray."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_features() -> dict:
    """The CPU model and whether it computes bf16 natively (REFERENCE.md §8: emulated bf16 ran
    8x slower than fp32 on hosts without these flags)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    present = [f for f in NATIVE_BF16_FLAGS if f in flags]
    return {"model": model, "native_bf16_flags": present, "native_bf16": bool(present),
            "torch": torch.__version__}


@torch.inference_mode()
def runner_overhead(model, *, batch: int = 8, context: int = 128, new_tokens: int = 5,
                    repeats: int = 15) -> dict:
    """Median time of one batched runner call of `new_tokens` per row after a `context`-token
    prefill, and how much of it is spent inside the model's forward (a forward hook pair times
    the model call itself). The rest is the runner's own work: cache bookkeeping, masks, ids."""
    from speccascade.models.runner import ModelRunner

    runner = ModelRunner(model, max_live_seqs=batch)
    inside: list[float] = []
    pre = model.register_forward_pre_hook(lambda *_: inside.append(-time.perf_counter()))
    post = model.register_forward_hook(lambda *_: inside.append(inside.pop() + time.perf_counter()))
    try:
        seqs = [[(7 * row + i) % 100 + 10 for i in range(context + new_tokens)] for row in range(batch)]
        runner.forward([(f"s{row}", s[:context], 1) for row, s in enumerate(seqs)])
        totals, forwards = [], []
        for _ in range(repeats + 3):
            inside.clear()
            started = time.perf_counter()
            runner.forward([(f"s{row}", s, new_tokens) for row, s in enumerate(seqs)])
            totals.append((time.perf_counter() - started) * 1000)
            forwards.append(sum(inside) * 1000)
            for row in range(batch):
                runner.rollback(f"s{row}", context)
    finally:
        pre.remove()
        post.remove()
    total, forward = sorted(totals[3:])[repeats // 2], sorted(forwards[3:])[repeats // 2]
    return {"batch": batch, "new_tokens": new_tokens, "runner_ms": total, "forward_ms": forward,
            "outside_fraction": max(0.0, total - forward) / forward if forward else 0.0}
