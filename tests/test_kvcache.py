"""The slab KV cache on tiny random checkpoints of every common architecture (float64).

Windows are smaller than the contexts generated, so sliding-window layers roll back past their
window on every rejection. References are fresh copies of the checkpoints on transformers' own
eager attention and cache: HF `generate` and full forwards without any cache.

SPECCASCADE_TEST_DEVICE=cuda runs the same checks on a GPU (`make gpu-check` does).
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tokenizer

from speccascade.engine.engine import Engine
from speccascade.engine.loop import Mode
from speccascade.models.kvcache import UnsupportedModelError
from speccascade.models.loader import load_model
from speccascade.models.runner import CapacityError, ModelRunner

DEVICE = os.environ.get("SPECCASCADE_TEST_DEVICE", "cpu")
WINDOW = 6
PROMPTS = ["def f1(x):\n    return", "x = 3 *", "def f12(x):\n    return x * 12"]
NEW_TOKENS = 32


def _config(arch: str, vocab: int, tok, layers: int):
    import transformers as tf

    ids = dict(vocab_size=vocab, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)
    if arch == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if arch == "qwen2":  # hybrid: full first layer, sliding-window layers after it
        return (tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                               max_window_layers=1), tf.Qwen2ForCausalLM)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=WINDOW), tf.MistralForCausalLM
    if arch == "phi3":
        return tf.Phi3Config(**common), tf.Phi3ForCausalLM
    if arch == "gpt2":
        return (tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **ids),
                tf.GPT2LMHeadModel)
    if arch == "gemma2":  # alternating sliding/full layers, softcapped attention and logits
        return (tf.Gemma2Config(**common, head_dim=8, sliding_window=WINDOW,
                                query_pre_attn_scalar=8, attn_logit_softcapping=5.0,
                                final_logit_softcapping=30.0), tf.Gemma2ForCausalLM)
    if arch == "gemma3":
        return (tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=WINDOW,
                                    query_pre_attn_scalar=8, sliding_window_pattern=2),
                tf.Gemma3ForCausalLM)
    raise ValueError(arch)


def _save(path, arch, tok, *, seed, layers):
    config, cls = _config(arch, len(tok), tok, layers)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # peaked logits: greedy never hinges on a near-tie
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    model.to(torch.float64).save_pretrained(path)
    tok.save_pretrained(path)
    return path


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "phi3", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    tok = make_tokenizer()
    return (_save(root / "target", request.param, tok, seed=1, layers=3),
            _save(root / "draft", request.param, tok, seed=2, layers=2))


def _reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                attn_implementation="eager").to(DEVICE).eval()


def test_greedy_speculative_equals_target_equals_hf_generate(arch_pair):
    engine = Engine.from_paths(*arch_pair, dtype="float64", device=DEVICE)
    reference = _reference(arch_pair[0])
    eos = engine.tokenizer.eos_token_id
    results = {}
    for mode, fields in [(Mode.TARGET, {}), (Mode.SPECULATIVE, {"num_draft_tokens": 4}),
                         (Mode.SPECULATIVE, {"num_draft_tokens": 3, "pipelined": False})]:
        requests = [engine.request(p, request_id=f"{mode.name}-{i}", mode=mode,
                                   max_new_tokens=NEW_TOKENS, **fields)
                    for i, p in enumerate(PROMPTS)]
        results[mode, len(fields)] = engine.generate(requests)
    target = results[Mode.TARGET, 0]
    rejected = sum(r.stats.drafted - r.stats.accepted for r in results[Mode.SPECULATIVE, 1])
    assert rejected > 0  # rollbacks happened
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([engine.encode(prompt)], device=DEVICE)
        out = reference.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS,
                                 eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
        expected = out[: out.index(eos)] if eos in out else out
        assert target[i].token_ids == expected
        for key in [(Mode.SPECULATIVE, 1), (Mode.SPECULATIVE, 2)]:
            assert results[key][i].token_ids == expected
    assert len(target[0].token_ids) > 2 * WINDOW  # the windows were passed


def test_batched_equals_one_at_a_time_with_rollbacks(arch_pair):
    model = load_model(arch_pair[0], dtype="float64", device=DEVICE)
    reference = _reference(arch_pair[0])
    runner = ModelRunner(model, max_live_seqs=4)
    gen = torch.Generator().manual_seed(0)
    seqs = {f"s{i}": torch.randint(0, 300, (3 + 7 * i,), generator=gen).tolist() for i in range(4)}

    def check(wanted):
        got = runner.forward([(k, seqs[k], n) for k, n in wanted.items()])
        for (seq_id, n), logits in zip(wanted.items(), got):
            with torch.no_grad():
                ids = torch.tensor([seqs[seq_id]], device=DEVICE)
                full = reference(ids).logits[0, -n:].float()
            torch.testing.assert_close(logits, full, rtol=1e-6, atol=1e-5)  # fp64, rounded to fp32

    check({k: 2 for k in seqs})
    for step in range(4):  # speculative-like rounds: extend by γ+1, roll back past the window
        for i, seq_id in enumerate(seqs):
            if (i + step) % 2:
                seqs[seq_id] = seqs[seq_id][: -min(3 + i, len(seqs[seq_id]) - 1)]
            seqs[seq_id] += torch.randint(0, 300, (1 + (i + step) % 5,), generator=gen).tolist()
        wanted = {k: 1 + (j + step) % 3 for j, k in enumerate(seqs) if j != step}
        check(dict(reversed(wanted.items())) if step % 2 else wanted)  # any order of calls
    assert max(len(s) for s in seqs.values()) > 2 * WINDOW


def test_unsupported_architecture_fails_at_load_naming_it(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    tok = make_tokenizer()
    MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                 state_size=4)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="mamba"):
        ModelRunner(load_model(tmp_path, dtype="float32"))


def test_token_budget_refuses_new_sequences_and_keeps_running_ones(tiny_pair):
    model = load_model(tiny_pair[0], dtype="float64", device=DEVICE)
    context = model.config.max_position_embeddings
    runner = ModelRunner(model, max_live_seqs=64, kv_cache_tokens=2 * context + 10)
    assert runner.kv_tokens() == (0, 2 * context)  # two slots of the whole context
    a, b = list(range(3, 40)), list(range(50, 60))
    runner.forward([("a", a, 1), ("b", b, 1)])
    with pytest.raises(CapacityError, match="kv_cache_tokens"):
        runner.forward([("a", a + [7], 1), ("c", [5, 6], 1)])
    assert runner.kv_tokens() == (len(a) + len(b), 2 * context)  # the refused call wrote nothing
    got = runner.forward([("a", a + [7, 8], 2), ("b", b[:-3] + [1], 1)])  # a rollback in b
    reference = _reference(tiny_pair[0])
    for tokens, logits in zip([a + [7, 8], b[:-3] + [1]], got):
        with torch.no_grad():
            ids = torch.tensor([tokens], device=DEVICE)
            full = reference(ids).logits[0, -len(logits):].float()
        torch.testing.assert_close(logits, full, rtol=1e-6, atol=1e-5)
    runner.release("a")
    runner.forward([("c", [5, 6], 1)])  # the freed slot serves a new sequence
    assert runner.kv_tokens() == (len(b) - 2 + 2, 2 * context)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        ModelRunner(model, kv_cache_tokens=context - 1)


def test_dtype_auto_is_float32_without_native_bf16(tiny_pair, monkeypatch):
    from speccascade.models import loader

    monkeypatch.setattr(loader, "native_bf16", lambda device: None)
    model = loader.load_model(tiny_pair[1], dtype="auto", device=DEVICE)
    assert model.dtype == torch.float32 and "no native bf16" in model.dtype_choice


def test_dtype_auto_measures_where_bf16_is_native(tiny_pair):
    from speccascade.models import loader

    if loader.native_bf16(DEVICE) is None:
        pytest.skip(f"{DEVICE} has no native bf16")
    model = loader.load_model(tiny_pair[1], dtype="auto", device=DEVICE)
    assert model.dtype in (torch.bfloat16, torch.float32)
    assert str(model.dtype).removeprefix("torch.") in model.dtype_choice
    if DEVICE.startswith("cuda"):
        assert model.dtype == torch.bfloat16
    else:
        assert "bf16" in model.dtype_choice and "fp32" in model.dtype_choice  # both were timed
    runner = ModelRunner(model)  # the slab takes the chosen dtype
    assert next(iter(runner.cache.keys.values())).dtype == model.dtype


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_bfloat16_runner_is_close_to_float64(arch, tmp_path):
    """Half precision takes the additive-mask path (full and sliding): close to float64."""
    path = _save(tmp_path / arch, arch, make_tokenizer(), seed=1, layers=3)
    runner = ModelRunner(load_model(path, dtype="bfloat16", device=DEVICE), max_live_seqs=3)
    reference = _reference(path)
    seqs = {f"s{i}": [(5 * i + 3 * j) % 290 + 1 for j in range(4 + 9 * i)] for i in range(3)}
    for step in range(3):
        got = runner.forward([(k, v, 2) for k, v in seqs.items()])
        for tokens, logits in zip(seqs.values(), got):
            with torch.no_grad():
                full = reference(torch.tensor([tokens], device=DEVICE)).logits[0, -2:].float()
            assert ((logits - full).abs().max() / full.abs().max()).item() < 0.15
        for k in seqs:
            seqs[k] = seqs[k][:-2] + [7, 8, 9, 10]  # roll back 2, extend 4


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_model_outside_the_runner_is_stock(arch, tmp_path):
    """After a runner took the model over, `generate` (plain and assisted: k tokens over a past
    cache) and plain forwards on the same object behave as stock SDPA, as the benchmark's
    peers use them."""
    tok = make_tokenizer()
    target = _save(tmp_path / "t", arch, tok, seed=1, layers=3)
    draft = _save(tmp_path / "d", arch, tok, seed=2, layers=2)
    model, helper = (load_model(p, dtype="float64", device=DEVICE) for p in (target, draft))
    ModelRunner(model).forward([("a", list(range(3, 30)), 1)])
    ModelRunner(helper)
    reference = _reference(target)
    ids = torch.tensor([list(range(5, 25))], device=DEVICE)
    expected = reference.generate(ids, do_sample=False, max_new_tokens=24)
    assert model.generate(ids, do_sample=False, max_new_tokens=24).tolist() == expected.tolist()
    assisted = model.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=helper)
    assert assisted.tolist() == expected.tolist()
    with torch.no_grad():
        # (the eager reference takes its softmax in float32)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-4)
