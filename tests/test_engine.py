"""The in-process engine on tiny random checkpoints loaded from disk (float64: no near-ties)."""
from __future__ import annotations

import pytest
import torch

from speccascade.engine.engine import Engine
from speccascade.engine.loop import Mode
from speccascade.models.loader import IncompatiblePairError, check_pair, load_model
from speccascade.models.runner import CapacityError, ModelRunner
from speccascade.sampling import SD_END, CascadeParams, DeferralRule, SamplingParams

PROMPTS = [f"def f{i}(x):\n    return" if i % 2 else f"x = {i} *" for i in range(20)]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine.from_paths(*tiny_pair, dtype="float64")


def run(engine, mode, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, **fields):
    requests = [engine.request(p, request_id=f"{mode.name}-{i}", mode=mode,
                               max_new_tokens=max_new_tokens, **fields)
                for i, p in enumerate(prompts)]
    return engine.generate(requests)


def hf_greedy(engine, prompt, max_new_tokens=NEW_TOKENS):
    model = engine.verifier.worker.runner.model
    ids = torch.tensor([engine.encode(prompt)])
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=engine.tokenizer.eos_token_id,
                         pad_token_id=engine.tokenizer.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = engine.tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_greedy_speculative_equals_target_equals_hf_generate(engine):
    target = run(engine, Mode.TARGET)
    speculative = run(engine, Mode.SPECULATIVE, num_draft_tokens=4)
    sequential = run(engine, Mode.SPECULATIVE, num_draft_tokens=3, pipelined=False)
    for prompt, t, s, q in zip(PROMPTS, target, speculative, sequential):
        assert s.token_ids == t.token_ids == q.token_ids
        assert t.token_ids == hf_greedy(engine, prompt)
        assert s.text == t.text
    assert sum(len(t.token_ids) for t in target) > 10 * len(PROMPTS)  # not all stopping at once


def test_identical_draft_accepts_everything(tiny_twins):
    engine = Engine.from_paths(*tiny_twins, dtype="float64")
    target = run(engine, Mode.TARGET, PROMPTS[:4], 40)
    spec = run(engine, Mode.SPECULATIVE, PROMPTS[:4], 40, num_draft_tokens=4)
    for t, s in zip(target, spec):
        assert s.token_ids == t.token_ids
        assert s.stats.accepted == s.stats.drafted > 0
        # every round after the first reuses the pipelined block: its draft time was hidden
        assert s.stats.hidden_draft_ms > 0


def test_draft_ahead_only_when_it_pays_and_output_is_unchanged(engine, tiny_twins):
    """Draft-ahead gating (explicit γ; the controller decides for itself) changes how much is
    drafted and thrown away, never the output."""
    params = SamplingParams(temperature=0.9, seed=5)
    runs = {cost: run(engine, Mode.SPECULATIVE, PROMPTS[:4], 40, sampling=params,
                      num_draft_tokens=4, draft_ahead_waste_cost=cost) for cost in (0.0, 1.0)}
    sequential = run(engine, Mode.SPECULATIVE, PROMPTS[:4], 40, sampling=params, pipelined=False,
                     num_draft_tokens=4)
    # pipelined=True overrides the gate: it drafts ahead as the zero-cost gate does (always)
    forced = run(engine, Mode.SPECULATIVE, PROMPTS[:4], 40, sampling=params, pipelined=True,
                 num_draft_tokens=4, draft_ahead_waste_cost=1.0)
    for always, gated, seq, force in zip(runs[0.0], runs[1.0], sequential, forced):
        assert always.token_ids == gated.token_ids == seq.token_ids == force.token_ids
        assert seq.stats.drafted_ahead == 0
        assert force.stats.drafted_ahead == always.stats.drafted_ahead
    ahead = {cost: sum(r.stats.drafted_ahead for r in rs) for cost, rs in runs.items()}
    wasted = {cost: sum(r.stats.discarded_draft_tokens for r in rs) for cost, rs in runs.items()}
    # random tiny pair: acceptance is low, so always drafting ahead mostly wastes; gating drafts less
    assert 0 < wasted[0.0] <= ahead[0.0] and ahead[1.0] < ahead[0.0] and wasted[1.0] < wasted[0.0]
    # identical twins: every block is accepted and every guess right, so the gate opens and
    # nothing drafted ahead is thrown away
    twins = Engine.from_paths(*tiny_twins, dtype="float64")
    for r in run(twins, Mode.SPECULATIVE, PROMPTS[:2], 40, num_draft_tokens=4,
                 draft_ahead_waste_cost=1.0):
        assert r.stats.drafted_ahead > 0 and r.stats.discarded_draft_tokens == 0


@pytest.mark.parametrize("rule", list(DeferralRule))
def test_cascade_at_sd_end_equals_speculative(engine, rule):
    cascade = CascadeParams(rule, SD_END[rule])
    spec = run(engine, Mode.SPECULATIVE, PROMPTS[:5], 32)
    casc = run(engine, Mode.CASCADE, PROMPTS[:5], 32, cascade=cascade)
    for s, c in zip(spec, casc):
        assert c.token_ids == s.token_ids


def test_seeded_sampling_is_reproducible_and_independent_of_companions(engine):
    """For a given γ. (The controller's γ follows measured load, and sampled output depends on
    where rounds start: with γ unset a seed fixes the distribution, not the sample.)"""
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    fixed = dict(num_draft_tokens=4)
    alone = run(engine, Mode.SPECULATIVE, PROMPTS[:1], 40, sampling=params, **fixed)
    crowd = run(engine, Mode.SPECULATIVE, PROMPTS[:6], 40,
                sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=1234), **fixed)
    other_seed = run(engine, Mode.SPECULATIVE, PROMPTS[:1], 40,
                     sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=99), **fixed)
    sequential = run(engine, Mode.SPECULATIVE, PROMPTS[:1], 40, sampling=params, pipelined=False,
                     **fixed)
    assert alone[0].token_ids == crowd[0].token_ids == sequential[0].token_ids
    assert alone[0].token_ids != other_seed[0].token_ids


def test_draft_mode_equals_draft_model_greedy(engine):
    draft_model = engine.drafter.worker.runner.model
    for prompt, result in zip(PROMPTS[:5], run(engine, Mode.DRAFT, PROMPTS[:5], 30)):
        ids = torch.tensor([engine.encode(prompt)])
        out = draft_model.generate(ids, do_sample=False, max_new_tokens=30,
                                   eos_token_id=engine.tokenizer.eos_token_id,
                                   pad_token_id=engine.tokenizer.pad_token_id)[0, ids.shape[1]:]
        expected = out.tolist()
        eos = engine.tokenizer.eos_token_id
        expected = expected[: expected.index(eos)] if eos in expected else expected
        assert result.token_ids == expected


def test_stop_strings_and_length(engine):
    [free] = run(engine, Mode.TARGET, PROMPTS[:1], 40)
    assert free.finish_reason in ("length", "eos")
    stop = free.text[5:8]
    [stopped] = run(engine, Mode.SPECULATIVE, PROMPTS[:1], 40, stop=(stop,))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    [short] = run(engine, Mode.SPECULATIVE, PROMPTS[:1], 3)
    assert len(short.token_ids) <= 3


def test_stats_are_consistent(engine):
    [r] = run(engine, Mode.SPECULATIVE, PROMPTS[:1], 48, num_draft_tokens=4)
    s = r.stats
    assert s.rounds > 0 and s.drafted >= s.accepted >= 0
    assert s.mean_accepted_length == pytest.approx((s.accepted + s.rounds) / s.rounds)
    assert s.ttft_ms <= s.total_ms


def test_kv_entries_released_after_requests(engine):
    run(engine, Mode.SPECULATIVE, PROMPTS[:8], 16)
    assert engine.drafter.worker.live_sequences() == 0
    assert engine.verifier.worker.live_sequences() == 0


@pytest.mark.parametrize("pair", ["tiny_pair", "tiny_twins"])
def test_speculative_runs_up_to_the_last_position_of_the_context(pair, request):
    """prompt + max_new_tokens == context: the block drafted ahead during verification must stop
    at the context too (it once ran one past it and failed the request)."""
    engine = Engine.from_paths(*request.getfixturevalue(pair), dtype="float64")
    new_tokens = 24
    prompt = [(7 * i) % 200 + 3 for i in range(engine.max_seq_len - new_tokens)]
    for gamma in (1, 4, 7):
        target, speculative = (run(engine, mode, [prompt], new_tokens, num_draft_tokens=gamma)[0]
                               for mode in (Mode.TARGET, Mode.SPECULATIVE))
        assert speculative.token_ids == target.token_ids and len(target.token_ids) == new_tokens


def test_runner_batched_logits_equal_one_at_a_time(tiny_pair):
    model = load_model(tiny_pair[0], dtype="float64")
    runner = ModelRunner(model, max_live_seqs=8)
    gen = torch.Generator().manual_seed(0)
    seqs = {f"s{i}": torch.randint(0, 300, (3 + 9 * i,), generator=gen).tolist() for i in range(4)}

    def reference(tokens, n):
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0, -n:].float()

    for (seq_id, tokens), got in zip(seqs.items(), runner.forward([(k, v, 2) for k, v in seqs.items()])):
        torch.testing.assert_close(got, reference(tokens, 2), rtol=0, atol=1e-9)
    # ragged extension, one sequence rolled back, one absent from the batch
    seqs["s0"] += [5, 6, 7]
    seqs["s1"] = seqs["s1"][:-4] + [9]
    seqs["s3"] += [1]
    ids = ["s0", "s1", "s3"]
    for seq_id, got in zip(ids, runner.forward([(k, seqs[k], 3) for k in ids])):
        torch.testing.assert_close(got, reference(seqs[seq_id], 3), rtol=0, atol=1e-9)
    # a different number of logits per row (only the wanted rows are projected onto the vocab)
    seqs["s0"] += [8, 9]
    seqs["s1"] += [1, 2, 3, 4]
    wanted = {"s0": 1, "s1": 4, "s2": 2}
    got = runner.forward([(k, seqs[k], n) for k, n in wanted.items()])
    for (seq_id, n), logits in zip(wanted.items(), got):
        assert logits.shape[0] == n
        torch.testing.assert_close(logits, reference(seqs[seq_id], n), rtol=0, atol=1e-9)


def test_runner_rollback_then_extend_equals_fresh_prefill(tiny_pair):
    model = load_model(tiny_pair[0], dtype="float64")
    runner, fresh = ModelRunner(model), ModelRunner(model)
    tokens = list(range(10, 40))
    runner.forward([("a", tokens, 1)])
    runner.rollback("a", 20)
    assert runner.cached_tokens("a") == tokens[:20]
    extended = tokens[:20] + [3, 4, 5]
    torch.testing.assert_close(runner.forward([("a", extended, 3)])[0],
                               fresh.forward([("b", extended, 3)])[0], rtol=0, atol=1e-9)


def test_runner_capacity_and_release(tiny_pair):
    runner = ModelRunner(load_model(tiny_pair[0], dtype="float64"), max_live_seqs=2)
    runner.forward([("a", [1, 2], 1), ("b", [3, 4], 1)])
    with pytest.raises(CapacityError, match="max_live_seqs=2"):
        runner.forward([("c", [5], 1)])
    runner.release("a")
    runner.forward([("c", [5], 1)])
    assert runner.live_sequences() == 2


def test_incompatible_pair_is_rejected(tiny_pair, tmp_path):
    from conftest import make_tokenizer, save_tiny_model

    other = save_tiny_model(tmp_path / "other", make_tokenizer(vocab_size=280), seed=3)
    with pytest.raises(IncompatiblePairError, match="different tokenizers"):
        check_pair(tiny_pair[0], other)


def test_adaptive_gamma_and_early_stop_keep_greedy_output(engine, tiny_twins):
    target = run(engine, Mode.TARGET, PROMPTS[:4], 40)
    adaptive = run(engine, Mode.SPECULATIVE, PROMPTS[:4], 40, num_draft_tokens=2, adaptive=True,
                   draft_stop_below=0.3)
    for t, a in zip(target, adaptive):
        assert a.token_ids == t.token_ids
    twins = Engine.from_paths(*tiny_twins, dtype="float64")
    [grown] = run(twins, Mode.SPECULATIVE, PROMPTS[:1], 60, num_draft_tokens=1, adaptive=True,
                  max_num_draft_tokens=8)
    # all drafts accepted → γ grows 1, 3, 5, 7, 8, ...: far fewer rounds than with γ = 1
    assert grown.stats.rounds < 60 / 4


@pytest.mark.slow
def test_default_pair_greedy_speculative_equals_target_equals_hf_generate():
    """The embedded pair as served (float32): 20 held-out prompts × 64 tokens, all concurrent."""
    from speccascade.bench.workload import throughput_prompts

    torch.set_num_threads(1)
    engine = Engine.default()
    prompts = [engine.tokenizer.decode(ids) for ids in throughput_prompts(engine.tokenizer, 20, 48)]
    assert len(prompts) == 20
    target = run(engine, Mode.TARGET, prompts)
    speculative = run(engine, Mode.SPECULATIVE, prompts, num_draft_tokens=4)
    for prompt, t, s in zip(prompts, target, speculative):
        assert s.token_ids == t.token_ids == hf_greedy(engine, prompt)
        assert s.stats.drafted > 0
    assert sum(s.stats.accepted for s in speculative) > 0
