"""The offline corpus: the CPython standard library sources every Python install carries.

Files are split deterministically into train and held-out by a hash of their path relative to the
stdlib root, so the split is the same on every machine with the same Python version.
"""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

HELD_OUT_PERCENT = 8  # of non-test modules; held out from tokenizer and model training


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test(rel: str) -> bool:
    return "/test/" in f"/{rel}" or "/tests/" in f"/{rel}" or "idle_test" in rel


def _is_generated(rel: str) -> bool:
    # Codec tables and build data are near-copies of each other: too easy to predict to be
    # honest evaluation text, so they always stay in the training split.
    return rel.startswith("encodings/") or rel.startswith("_sysconfigdata")


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Return (train_files, held_out_files), each sorted by path."""
    root = root or stdlib_root()
    train, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if not _is_test(rel) and not _is_generated(rel) and zlib.crc32(rel.encode()) % 100 < HELD_OUT_PERCENT:
            held_out.append(path)
        else:
            train.append(path)
    return train, held_out


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
