"""`speccascade models build --quick` end to end (tiny step counts, a slice of the corpus): every
stage runs, a resumed build redoes only its stages, and the outputs are ordinary HF checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def build(out, *extra):
    subprocess.run([sys.executable, "-m", "speccascade.cli", "models", "build", "--quick",
                    "--out", str(out), *extra], check=True, timeout=600)


def test_quick_build_all_stages_then_resume_draft(tmp_path):
    build(tmp_path)
    log = json.loads((tmp_path / "build_log.json").read_text())
    assert {"target_cycle1_final_loss", "target_final_loss", "draft_final_kl",
            "held_out_files"} <= set(log)
    for name in ("target_stage1", "target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, local_files_only=True)
        assert next(model.parameters()).dtype == torch.bfloat16  # saved as committed
    tok = AutoTokenizer.from_pretrained(tmp_path / "draft", local_files_only=True)
    assert tok.eos_token == "<|endoftext|>"

    target_before = (tmp_path / "target" / "model.safetensors").read_bytes()
    draft_before = (tmp_path / "draft" / "model.safetensors").read_bytes()
    build(tmp_path, "--from-stage", "draft")
    # The resumed draft stage reads the same saved target: the same draft, the target untouched.
    assert (tmp_path / "target" / "model.safetensors").read_bytes() == target_before
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() == draft_before
