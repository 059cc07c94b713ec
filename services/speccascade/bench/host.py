"""What the benchmark host is."""
from __future__ import annotations

import platform
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
