"""Where a service process spends its CPU: a py-spy profile under load, summed by library.

py-spy samples the process's Python stacks (`-f raw`: one line per distinct stack, "frame;frame;…
count"). Each sample is charged to the library of its innermost frame, so time in native code is
charged to the Python frame that called it (Ray's core worker shows up as `ray/_raylet.pyx`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

# (label, path fragment), first match wins: our code before Serve before the rest of Ray.
# Paths are full (`--full-filenames`); a thread's own run loop (threading.py, a thread pool) on top
# means a native call below it: an event loop's select, or a wait.
LIBRARIES = (("speccascade", "/speccascade/"), ("Ray Serve", "/ray/serve/"), ("Ray core", "/ray/"),
             ("grpc", "/grpc/"), ("asyncio", "/asyncio/"), ("protobuf", "/google/protobuf/"),
             ("torch", "/torch/"), ("transformers", "/transformers/"),
             ("thread pools", "/concurrent/futures/"), ("thread run loops", "/threading.py"))


def library(frame: str) -> str:
    """'func (path/to/file.py:12)' -> the library label of that file."""
    path = frame.rsplit("(", 1)[-1]
    return next((label for label, part in LIBRARIES if part in path), "other")


def summarize(raw: str) -> dict:
    """Samples by library of the innermost frame, and the share with our code anywhere on the stack."""
    self_counts: Counter = Counter()
    ours_on_stack = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        self_counts[library(frames[-1])] += int(count)
        ours_on_stack += int(count) * any(library(f) == "speccascade" for f in frames)
    total = sum(self_counts.values())
    return {"samples": total,
            "self_share": {k: v / total for k, v in self_counts.most_common()} if total else {},
            "speccascade_on_stack": ours_on_stack / total if total else 0.0}


def py_spy() -> str:
    return shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")


def record(pid: int, seconds: float, load: Callable[[float], object], rate: int = 100,
           raw_out: str | Path | None = None) -> dict:
    """Profile `pid` for `seconds` while `load(seconds + 1)` keeps it busy; `raw_out` also keeps
    py-spy's raw output there (for flamegraph.pl)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(raw_out) if raw_out else Path(scratch) / "profile.raw"
        spy = subprocess.Popen([py_spy(), "record", "-p", str(pid), "-f", "raw", "--full-filenames",
                                "-d", str(max(1, round(seconds))), "-r", str(rate), "--nonblocking",
                                "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        load(seconds + 1)
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode()[-300:]}")
        return {**summarize(out.read_text()), "seconds": seconds, "rate_hz": rate}
