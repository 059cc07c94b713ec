"""`speccascade models build --quick` end to end (a handful of prompts and steps, on the real
default target, skipped only before the install step): every stage runs, a killed or repeated
build reuses finished work, a redone draft stage is deterministic, the draft loads through the
service's loader (the target's embedding attached, its head cut to the chosen tokens) and shares
the target's tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from speccascade.models import fetch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not fetch.is_valid(fetch.target_dir()), reason="default target not installed (make install)")]


def build(out, *extra):
    subprocess.run([sys.executable, "-m", "speccascade.cli", "models", "build", "--quick",
                    "--out", str(out), *extra], check=True, timeout=600)


def test_quick_build_all_stages_then_resume_and_redo_the_draft(tmp_path):
    from safetensors import safe_open

    from speccascade.models.build import HEAD_SIZES, quick_config
    from speccascade.models.loader import check_pair, load_model
    from speccascade.models.vocab_head import ReducedVocabHead

    build(tmp_path)
    log = json.loads((tmp_path / "build_log.json").read_text())
    cfg = quick_config()
    assert log["train_prompts"] == cfg.prompts
    assert 0 < log["train_generated_tokens"] <= cfg.prompts * cfg.max_new_tokens
    chosen = log["shape"]["chosen"]
    assert chosen in log["shape"]["candidates"]
    assert [r["layers"] for r in log["shape"]["candidates"]] == list(cfg.depths)
    head = log["head"]["chosen"]
    assert head in log["head"]["rows"] and head["head_size"] in HEAD_SIZES
    files = (tmp_path / "draft" / "model.safetensors")
    with safe_open(str(files), "pt") as f:  # the layers alone: the embedding is the target's
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
        assert "model.embed_tokens.weight" not in f.keys()
    model = load_model(tmp_path / "draft", "float32")
    assert model.config.num_hidden_layers == chosen["layers"]
    assert isinstance(model.lm_head, ReducedVocabHead)
    assert len(model.lm_head.token_ids) == head["head_size"]
    target = load_model(fetch.target_dir(), "float32")
    assert torch.equal(model.get_input_embeddings().weight, target.get_input_embeddings().weight)
    # q is exactly zero outside the head: the draft never proposes those tokens.
    q = model(torch.tensor([[1, 2, 3]])).logits[0, -1].softmax(-1)
    outside = torch.ones_like(q, dtype=torch.bool)
    outside[model.lm_head.token_ids] = False
    assert q[outside].max() == 0 and abs(q.sum().item() - 1) < 1e-5
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
