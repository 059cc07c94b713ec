"""`speccascade models build --quick` end to end (a handful of prompts and steps, on the real
default target, skipped only before the install step): every stage runs, a killed or repeated
build reuses finished work, a redone draft stage is deterministic, the draft is an ordinary HF
checkpoint sharing the target's tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from speccascade.models import fetch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not fetch.is_valid(fetch.target_dir()), reason="default target not installed (make install)")]


def build(out, *extra):
    subprocess.run([sys.executable, "-m", "speccascade.cli", "models", "build", "--quick",
                    "--out", str(out), *extra], check=True, timeout=600)


def test_quick_build_all_stages_then_resume_and_redo_the_draft(tmp_path):
    from speccascade.models.build import quick_config
    from speccascade.models.loader import check_pair

    build(tmp_path)
    log = json.loads((tmp_path / "build_log.json").read_text())
    cfg = quick_config()
    assert log["train_prompts"] == cfg.prompts
    assert 0 < log["train_generated_tokens"] <= cfg.prompts * cfg.max_new_tokens
    chosen = log["shape"]["chosen"]
    assert chosen in log["shape"]["candidates"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "draft", local_files_only=True)
    assert next(model.parameters()).dtype == torch.bfloat16  # saved as committed
    assert model.config.hidden_size == chosen["shape"]["hidden_size"]
    check_pair(fetch.target_dir(), tmp_path / "draft")  # same tokenizer and vocabulary
    work = tmp_path / "work"
    shards = {p.name: p.stat().st_mtime_ns for p in work.glob("shard_*.pt")}
    assert len(shards) == cfg.prompts // cfg.shard_prompts

    draft_before = (tmp_path / "draft" / "model.safetensors").read_bytes()
    build(tmp_path)  # everything finished: nothing is generated again, the same draft
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("shard_*.pt")} == shards
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() == draft_before
    build(tmp_path, "--from-stage", "draft")  # retrained from its seed: the same draft
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("shard_*.pt")} == shards
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() == draft_before
