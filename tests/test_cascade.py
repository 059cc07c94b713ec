"""Tests for the speculative-cascade target π (speccascade.sampling.cascade_target) and for
verification against π with the same lossless sampler."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from speccascade import sampling
from speccascade.sampling import (ALPHA_RANGE, DRAFT_END, SD_END, VERIFY_STREAM, CascadeParams,
                                  DeferralRule, ParamError, SamplingParams, cascade_target,
                                  process_logits, round_generator, verify)
from test_sampling import ROUNDS, follows, position_checks, random_p_q, run_rounds

R = DeferralRule

# A small fixed pair, temperature 1 (processed = raw):
#   max q = 0.5, max p = 0.4, TV(q, p) = Σ max(0, q − p) = 0.3 (token 0 only).
P = [0.2, 0.4, 0.3, 0.1]
Q = [0.5, 0.3, 0.15, 0.05]


def as_batch(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, None, :]    # [1, 1, vocab]


def target_for(rule: DeferralRule, alpha: float, p=P, q=Q, p_raw=None, q_raw=None):
    p_raw = P if p_raw is None else p_raw
    q_raw = Q if q_raw is None else q_raw
    pi, deferred = cascade_target(as_batch(p), as_batch(q), as_batch(p_raw), as_batch(q_raw),
                                  [CascadeParams(rule, alpha)])
    return pi[0, 0], bool(deferred[0, 0])


# ---------------------------------------------------------------------------------------------
# Hand-computed π for each rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, alpha, keeps_q, why", [
    (R.CHOW, 0.6, True, "max q 0.5 >= 1 - 0.6 = 0.4"),
    (R.CHOW, 0.3, False, "max q 0.5 < 1 - 0.3 = 0.7"),
    (R.DIFF, 0.0, True, "max q 0.5 >= max p 0.4 - 0"),
    (R.DIFF, -0.2, False, "max q 0.5 < 0.4 + 0.2 = 0.6"),
    (R.OPT, -0.2, True, "max q 0.5 >= 0.4 + 0.2 * TV 0.3 = 0.46"),
    (R.OPT, -0.5, False, "max q 0.5 < 0.4 + 0.5 * TV 0.3 = 0.55"),
])
def test_whole_distribution_rules_by_hand(rule, alpha, keeps_q, why):
    pi, deferred = target_for(rule, alpha)
    assert torch.equal(pi, torch.tensor(Q if keeps_q else P)), why
    assert deferred is not keeps_q


@pytest.mark.parametrize("rule, alpha, expected, why", [
    # A = {v : q(v) >= 0.4 - 0.2} = {0, 1}; rest 1 - 0.8 = 0.2
    (R.TOKEN_V1, 0.2, [0.5 + 0.2 * 0.2, 0.3 + 0.2 * 0.4, 0.2 * 0.3, 0.2 * 0.1], "A={0,1}"),
    # A = {v : p(v) >= 0.4 - 0.15} = {1, 2}; rest 1 - 0.45 = 0.55
    (R.TOKEN_V2, 0.15, [0.55 * 0.2, 0.3 + 0.55 * 0.4, 0.15 + 0.55 * 0.3, 0.55 * 0.1], "A={1,2}"),
    # A = {v : p(v) >= 0.4 * 0.4 = 0.16} = {0, 1, 2}; rest 0.05
    (R.TOKEN_V3, 0.6, [0.5 + 0.05 * 0.2, 0.3 + 0.05 * 0.4, 0.15 + 0.05 * 0.3, 0.05 * 0.1],
     "A={0,1,2}"),
    # Token-V3 at α = 0 keeps only a = argmax p = 1: q(a)·δ_a + (1 − q(a))·p — not p
    (R.TOKEN_V3, 0.0, [0.7 * 0.2, 0.3 + 0.7 * 0.4, 0.7 * 0.3, 0.7 * 0.1], "A={1}"),
])
def test_token_rules_by_hand(rule, alpha, expected, why):
    pi, deferred = target_for(rule, alpha)
    torch.testing.assert_close(pi, torch.tensor(expected), msg=why)
    assert deferred


def test_token_rule_accepting_every_token_is_q():
    pi, deferred = target_for(R.TOKEN_V2, 0.35)    # threshold 0.05: every p(v) >= it
    assert torch.equal(pi, torch.tensor(Q)) and not deferred


def test_deferral_decision_uses_temperature_one_probabilities():
    """Greedy sampling (one-hot processed p, q) but the decision reads the raw probabilities."""
    p_greedy, q_greedy = [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]
    # Chow α = 0.3: raw max q 0.5 < 0.7 → defer (the one-hot max q = 1 would have kept q).
    pi, deferred = target_for(R.CHOW, 0.3, p=p_greedy, q=q_greedy)
    assert deferred and torch.equal(pi, torch.tensor(p_greedy))
    # Token-V3 α = 0.6: raw A = {0, 1, 2} holds q's token 0 → π = q (one-hot p would give A = {1}).
    pi, deferred = target_for(R.TOKEN_V3, 0.6, p=p_greedy, q=q_greedy)
    assert not deferred and torch.equal(pi, torch.tensor(q_greedy))


# ---------------------------------------------------------------------------------------------
# π is a distribution, for every rule, α and sampling setting
# ---------------------------------------------------------------------------------------------


def alpha_strategy(rule: DeferralRule):
    lo, hi = ALPHA_RANGE[rule]
    if math.isinf(lo):
        return st.one_of(st.floats(-5, 5), st.sampled_from([SD_END[rule], DRAFT_END[rule]]))
    return st.floats(lo, hi)


cascade_strategy = st.sampled_from(list(R)).flatmap(
    lambda rule: alpha_strategy(rule).map(lambda alpha: CascadeParams(rule, alpha)))
sampling_strategy = st.builds(SamplingParams, temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
                              top_k=st.integers(0, 6), top_p=st.sampled_from([0.3, 0.9, 1.0]))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), cascades=st.lists(cascade_strategy, min_size=3, max_size=3),
       params=sampling_strategy)
def test_pi_is_a_distribution(seed, cascades, params):
    gen = torch.Generator().manual_seed(seed)
    target_logits = 2 * torch.randn(3, 2, 6, generator=gen)
    draft_logits = 2 * torch.randn(3, 2, 6, generator=gen)
    p = process_logits(target_logits, [params] * 3)
    q = process_logits(draft_logits, [params] * 3)
    pi, deferred = cascade_target(p, q, target_logits.softmax(-1), draft_logits.softmax(-1),
                                  cascades)
    assert pi.shape == p.shape and deferred.shape == (3, 2)
    assert (pi >= 0).all()
    torch.testing.assert_close(pi.sum(-1), torch.ones(3, 2))
    assert (pi[(p == 0) & (q == 0)] == 0).all()
    for b, c in enumerate(cascades):
        if c.rule in sampling.WHOLE_DISTRIBUTION_RULES:      # π is exactly p or exactly q
            expected = torch.where(deferred[b, :, None], p[b], q[b])
            assert torch.equal(pi[b], expected)
        else:                                                # not deferred ⇔ π = q
            assert torch.equal(pi[b][~deferred[b]], q[b][~deferred[b]])


def test_rows_with_different_rules_match_each_row_alone():
    gen = torch.Generator().manual_seed(8)
    p = torch.randn(6, 3, 10, generator=gen).softmax(-1)
    q = torch.randn(6, 3, 10, generator=gen).softmax(-1)
    cascades = [CascadeParams(rule, alpha) for rule, alpha in
                [(R.CHOW, 0.8), (R.DIFF, 0.05), (R.OPT, 0.3), (R.TOKEN_V1, 0.1),
                 (R.TOKEN_V2, 0.2), (R.TOKEN_V3, 0.5)]]
    pi, deferred = cascade_target(p, q, p, q, cascades)
    for b, c in enumerate(cascades):
        pi_b, deferred_b = cascade_target(p[b:b + 1], q[b:b + 1], p[b:b + 1], q[b:b + 1], [c])
        assert torch.equal(pi[b:b + 1], pi_b) and torch.equal(deferred[b:b + 1], deferred_b)


# ---------------------------------------------------------------------------------------------
# The two ends of α: pure speculative decoding and draft only
# ---------------------------------------------------------------------------------------------

BATCH, GAMMA, VOCAB = 16, 4, 12


def random_round(seed: int, params: SamplingParams):
    """Logits → processed p [b, γ+1, V], q [b, γ, V], raw probs, and drafts sampled from q."""
    gen = torch.Generator().manual_seed(seed)
    target_logits = 2 * torch.randn(BATCH, GAMMA + 1, VOCAB, generator=gen)
    draft_logits = 2 * torch.randn(BATCH, GAMMA, VOCAB, generator=gen)
    p = process_logits(target_logits, [params] * BATCH)
    q = process_logits(draft_logits, [params] * BATCH)
    drafts = torch.multinomial(q.reshape(-1, VOCAB), 1, generator=gen).reshape(BATCH, GAMMA)
    num_drafts = torch.randint(0, GAMMA + 1, (BATCH,), generator=gen)
    return p, q, target_logits.softmax(-1), draft_logits.softmax(-1), drafts, num_drafts


def verify_cascade(p, q, p_raw, q_raw, drafts, num_drafts, cascade: CascadeParams, seed: int):
    """Verify against π at the drafted positions and p at the bonus position."""
    pi, deferred = cascade_target(p[:, :GAMMA], q, p_raw[:, :GAMMA], q_raw, [cascade] * BATCH)
    target = torch.cat([pi, p[:, GAMMA:]], dim=1)                       # [batch, γ + 1, vocab]
    generators = [round_generator(seed, 1000 + b, VERIFY_STREAM) for b in range(BATCH)]
    return pi, deferred, verify(drafts, num_drafts, q, target, generators)


def verify_sd(p, q, drafts, num_drafts, seed: int):
    generators = [round_generator(seed, 1000 + b, VERIFY_STREAM) for b in range(BATCH)]
    return verify(drafts, num_drafts, q, p, generators)


@pytest.mark.parametrize("rule", [R.CHOW, R.DIFF, R.OPT, R.TOKEN_V1, R.TOKEN_V2])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, seed=1),
                                    SamplingParams(temperature=1.3, top_k=6, top_p=0.9, seed=2)])
def test_sd_end_is_speculative_decoding_exactly(rule, params):
    p, q, p_raw, q_raw, drafts, num_drafts = random_round(params.seed, params)
    assert q_raw.amax() < 1                          # Chow's α = 0 needs max q below exactly 1
    pi, deferred, out = verify_cascade(p, q, p_raw, q_raw, drafts, num_drafts,
                                       CascadeParams(rule, SD_END[rule]), seed=params.seed)
    assert torch.equal(pi, p[:, :GAMMA]) and deferred.all()
    sd = verify_sd(p, q, drafts, num_drafts, seed=params.seed)
    assert torch.equal(out.tokens, sd.tokens) and torch.equal(out.num_accepted, sd.num_accepted)


def test_token_v3_sd_end_is_speculative_decoding_at_temperature_zero():
    greedy = SamplingParams(temperature=0.0)
    p, q, p_raw, q_raw, _, num_drafts = random_round(3, greedy)
    drafts = q.argmax(-1)
    pi, _, out = verify_cascade(p, q, p_raw, q_raw, drafts, num_drafts,
                                CascadeParams(R.TOKEN_V3, SD_END[R.TOKEN_V3]), seed=3)
    assert torch.equal(pi, p[:, :GAMMA])
    assert torch.equal(out.tokens, verify_sd(p, q, drafts, num_drafts, seed=3).tokens)


@pytest.mark.parametrize("rule", list(R))
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8),
                                    SamplingParams(temperature=0.0),
                                    SamplingParams(temperature=1.3, top_k=6, top_p=0.9)])
def test_draft_end_is_q_and_accepts_every_draft(rule, params):
    p, q, p_raw, q_raw, drafts, num_drafts = random_round(4, params)
    pi, deferred, out = verify_cascade(p, q, p_raw, q_raw, drafts, num_drafts,
                                       CascadeParams(rule, DRAFT_END[rule]), seed=4)
    assert torch.equal(pi, q)
    if rule is R.OPT:
        # OPT's α multiplies TV(q, p); where TV = 0 (p == q, e.g. the same greedy token) the rule
        # reduces to max q >= max p and may set δ = 1 — harmless, π = p = q there.
        assert torch.equal(p[:, :GAMMA][deferred], q[deferred])
    else:
        assert not deferred.any()
    assert torch.equal(out.num_accepted, num_drafts)
    # the emitted token after the accepted drafts is the bonus from p: drafts are kept verbatim
    for b, n in enumerate(num_drafts.tolist()):
        assert out.tokens[b, :n].tolist() == drafts[b, :n].tolist()


# ---------------------------------------------------------------------------------------------
# Cascade sampling follows π (statistical, same check as for speculative decoding)
# ---------------------------------------------------------------------------------------------

CASCADE_GAMMA = 3


@pytest.mark.parametrize("rule, alpha", [
    (R.CHOW, 0.83), (R.DIFF, 0.0), (R.OPT, 0.1),          # α chosen so that δ differs by position
    (R.TOKEN_V1, 0.1), (R.TOKEN_V2, 0.05), (R.TOKEN_V3, 0.5),
])
def test_cascade_output_follows_pi(rule, alpha):
    gen = torch.Generator().manual_seed(2024)
    p, q = random_p_q(CASCADE_GAMMA, 16, gen)                  # p [γ+1, V], q [γ, V]
    pi, _ = cascade_target(p[None, :CASCADE_GAMMA], q[None], p[None, :CASCADE_GAMMA], q[None],
                           [CascadeParams(rule, alpha)])
    target = torch.cat([pi[0], p[CASCADE_GAMMA:]])             # π at drafts, p for the bonus
    assert not torch.equal(target, p)                          # π really differs from p somewhere
    out = run_rounds(target, q, ROUNDS, gen)
    checks = position_checks(out, target)
    assert all(c["ok"] for c in checks), checks
    assert not follows(out, p)                                 # and the check can tell π from p


# ---------------------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, alpha, allowed", [
    (R.CHOW, -0.01, "[0, 1]"), (R.CHOW, 1.5, "[0, 1]"),
    (R.DIFF, -1.01, "[-1, 1]"), (R.DIFF, 2.0, "[-1, 1]"),
    (R.OPT, math.inf, "finite"), (R.OPT, -math.inf, "finite"),
    (R.TOKEN_V1, 1.2, "[-1, 1]"), (R.TOKEN_V2, -3.0, "[-1, 1]"),
    (R.TOKEN_V3, -0.5, "[0, 1]"), (R.TOKEN_V3, 1.01, "[0, 1]"),
] + [(rule, math.nan, "finite") for rule in R])
def test_alpha_out_of_range_names_the_field_and_range(rule, alpha, allowed):
    with pytest.raises(ParamError) as err:
        CascadeParams(rule, alpha)
    assert err.value.field == "deferral_threshold"
    assert rule.name in str(err.value) and allowed in str(err.value)


def test_unknown_rule_is_rejected_and_ints_are_accepted():
    with pytest.raises(ParamError) as err:
        CascadeParams(0, 0.5)
    assert err.value.field == "deferral_rule"
    assert CascadeParams(3, -7.5).rule is R.OPT
    assert [int(r) for r in R] == [1, 2, 3, 4, 5, 6]


def test_ends_are_inside_the_allowed_ranges():
    for rule in R:
        lo, hi = ALPHA_RANGE[rule]
        assert lo <= SD_END[rule] <= hi and lo <= DRAFT_END[rule] <= hi
        CascadeParams(rule, SD_END[rule])
        CascadeParams(rule, DRAFT_END[rule])


# ---------------------------------------------------------------------------------------------
# Sparse draft payloads: what the verifier's cascade reads is what every rule needs
# ---------------------------------------------------------------------------------------------

SPARSE_VOCAB, SPARSE_GAMMA = 40, 3


def shipped_cascade(rule: DeferralRule, alpha: float, params: SamplingParams, k: int, seed: int):
    """Draft logits through the real drafter (ship q′ over top k, plus raw q) and the real verifier's
    cascade; and the same π computed densely from q′ and the *full* temperature-1 q.
    -> (π the verifier used [γ, V], π from the dense inputs [γ, V])."""
    from speccascade.engine.seam import DraftRequest, SparseDraft, VerifyRequest
    from speccascade.engine.workers import DraftWorker, VerifyWorker

    gen = torch.Generator().manual_seed(seed)
    draft_logits = 2 * torch.randn(SPARSE_GAMMA, 1, SPARSE_VOCAB, generator=gen)  # rows = positions
    target_logits = 2 * torch.randn(1, SPARSE_GAMMA + 1, SPARSE_VOCAB, generator=gen)
    requests = [DraftRequest("s", [], 1, params, position=j, ship_top_k=k, ship_raw=True)
                for j in range(SPARSE_GAMMA)]
    tokens, rows = DraftWorker._sample(draft_logits, requests, step=0)
    sparse = SparseDraft(*(torch.stack(part) for part in zip(*rows)))
    verify_request = VerifyRequest("s", [1], tokens.tolist(), params, sparse,
                                   CascadeParams(rule, alpha))
    p = process_logits(target_logits, [params])                               # [1, γ+1, V]
    q = VerifyWorker._draft_probs([verify_request], tokens[None], SPARSE_GAMMA, SPARSE_VOCAB)
    used, _ = VerifyWorker._cascade([verify_request], p, q, target_logits, SPARSE_GAMMA,
                                    SPARSE_VOCAB)
    dense, _ = cascade_target(p[:, :SPARSE_GAMMA], q, target_logits[:, :SPARSE_GAMMA].softmax(-1),
                              draft_logits.transpose(0, 1).softmax(-1), [CascadeParams(rule, alpha)])
    assert torch.equal(used[:, SPARSE_GAMMA:], p[:, SPARSE_GAMMA:])           # bonus keeps p
    return used[0, :SPARSE_GAMMA], dense[0]


@pytest.mark.parametrize("rule", list(R))
@pytest.mark.parametrize("alpha_at", [0.25, 0.5, 0.75])          # where in the rule's range
@pytest.mark.parametrize("params, k", [(SamplingParams(temperature=0.8, seed=3), 8),
                                       (SamplingParams(temperature=1.2, top_p=0.9, seed=4), 12),
                                       (SamplingParams(temperature=0.0), 1)])   # greedy: k = 1
def test_sparse_cascade_payload_gives_the_dense_pi(rule, alpha_at, params, k):
    lo, hi = ALPHA_RANGE[rule]
    lo, hi = (-0.5, 0.5) if rule is R.OPT else (lo, hi)
    used, dense = shipped_cascade(rule, lo + alpha_at * (hi - lo), params, k, seed=11)
    assert torch.allclose(used, dense, atol=1e-6, rtol=0)
    assert torch.allclose(used.sum(-1), torch.ones(SPARSE_GAMMA), atol=1e-5)  # π is a distribution


def test_greedy_cascades_ship_one_token_and_its_raw_q_per_position():
    from speccascade.engine.loop import GenerationRequest, Mode, _State

    request = GenerationRequest("r", [1, 2], 8, mode=Mode.CASCADE,
                                cascade=CascadeParams(R.TOKEN_V1, 0.2))
    state = _State(request, None, None, None, [1, 2])
    draft = state.draft_request([1, 2], 4)
    assert draft.ship_top_k == 1 and draft.ship_raw
    sampled = GenerationRequest("r", [1, 2], 8, mode=Mode.SPECULATIVE,
                                sampling=SamplingParams(temperature=0.8), draft_top_k=32)
    assert _State(sampled, None, None, None, [1, 2]).draft_request([1, 2], 4).ship_top_k == 32
    greedy = GenerationRequest("r", [1, 2], 8, mode=Mode.SPECULATIVE)
    assert _State(greedy, None, None, None, [1, 2]).draft_request([1, 2], 4).ship_top_k == 0


# ---------------------------------------------------------------------------------------------
# The temperature-0 fast path: π's token without building π
# ---------------------------------------------------------------------------------------------


def greedy_alpha(rule: DeferralRule, where: float) -> float:
    lo, hi = ALPHA_RANGE[rule]
    lo, hi = (-1.0, 1.0) if rule is R.OPT else (lo, hi)
    return lo + where * (hi - lo)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), gamma=st.integers(1, 4),
       where=st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=4, max_size=4),
       rules=st.lists(st.sampled_from(list(R)), min_size=4, max_size=4))
def test_greedy_cascade_tokens_equal_the_argmax_of_the_dense_pi(seed, batch, gamma, where, rules):
    """Reference: cascade_target on one-hot p, q with the *full* temperature-1 p and q."""
    vocab = 12
    gen = torch.Generator().manual_seed(seed)
    p_logits = 2 * torch.randn(batch, gamma, vocab, generator=gen)
    q_logits = 2 * torch.randn(batch, gamma, vocab, generator=gen)
    # Half the drafts agree with the target's argmax, as a good draft's would.
    agree = torch.rand(batch, gamma, generator=gen) < 0.5
    q_logits = torch.where(agree[..., None], p_logits + 0.5 * q_logits, q_logits)
    params = [CascadeParams(rules[b], greedy_alpha(rules[b], where[b])) for b in range(batch)]
    greedy = [SamplingParams()] * batch
    p, q = process_logits(p_logits, greedy), process_logits(q_logits, greedy)  # one-hot
    drafts = q.argmax(-1)
    p_raw, q_raw = p_logits.softmax(-1), q_logits.softmax(-1)
    pi, deferred = cascade_target(p, q, p_raw, q_raw, params)
    tokens, fast_deferred = sampling.cascade_greedy_tokens(
        drafts, p_raw, q_raw.gather(-1, drafts[..., None])[..., 0], params)
    assert torch.equal(pi.amax(-1), torch.ones(batch, gamma))    # π is one-hot at temperature 0
    assert torch.equal(tokens, pi.argmax(-1))
    assert torch.equal(fast_deferred, deferred)


@pytest.mark.parametrize("rule", list(R))
@pytest.mark.parametrize("where", [0.0, 0.3, 0.7, 1.0])
def test_greedy_cascade_worker_path_equals_the_dense_sampler(rule, where):
    """VerifyWorker's greedy cascade rows (no dense π) emit what the dense lossless sampler emits
    on one-hot p and q, bonus and shorter rows included."""
    from speccascade.engine.seam import SparseDraft, VerifyRequest
    from speccascade.engine.workers import VerifyWorker

    gen = torch.Generator().manual_seed(int(where * 10) + int(rule))
    vocab, gamma = 16, 4
    p_logits = 2 * torch.randn(3, gamma + 1, vocab, generator=gen)
    lengths = [4, 2, 0]  # the last row is a plain target step
    drafts = torch.zeros(3, gamma, dtype=torch.long)
    requests = []
    for b, n in enumerate(lengths):
        tokens = torch.where(torch.rand(n, generator=gen) < 0.6, p_logits[b, :n].argmax(-1),
                             torch.randint(0, vocab, (n,), generator=gen))
        drafts[b, :n] = tokens
        raw = torch.rand(n, 1, generator=gen)
        requests.append(VerifyRequest(f"s{b}", [1], tokens.tolist(), SamplingParams(),
                                      SparseDraft(tokens[:, None].int(), torch.ones(n, 1), raw)
                                      if n else None,
                                      CascadeParams(rule, greedy_alpha(rule, where))))
    num_drafts = torch.tensor(lengths)
    best = p_logits.argmax(-1)
    deferred = VerifyWorker._greedy_cascade(requests, best, p_logits, drafts, num_drafts)
    fast = sampling.verify_greedy_tokens(drafts, num_drafts, best)
    greedy = [SamplingParams()] * 3
    p = process_logits(p_logits, greedy)
    q = VerifyWorker._draft_probs(requests, drafts, gamma, vocab)
    p, dense_deferred = VerifyWorker._cascade(requests, p, q, p_logits, gamma, vocab)
    generators = [round_generator(0, 1, VERIFY_STREAM) for _ in requests]
    dense = verify(drafts, num_drafts, q, p, generators)
    assert torch.equal(fast.num_accepted, dense.num_accepted)
    assert torch.equal(fast.tokens, dense.tokens)
    for b, n in enumerate(lengths):
        examined = min(int(fast.num_accepted[b]) + 1, n)
        assert int(deferred[b, :examined].sum()) == int(dense_deferred[b, :examined].sum())


def test_sparse_draft_pickles_through_numpy_and_back():
    """What crosses the Ray hops: the same tensors (dtype, values) come back, writable."""
    import pickle

    from speccascade.engine.seam import SparseDraft

    sparse = SparseDraft(torch.tensor([[3, 1], [2, 0]], dtype=torch.int32),
                         torch.tensor([[0.7, 0.3], [0.6, 0.4]]), torch.tensor([[0.5, 0.2], [0.4, 0.1]]))
    for original in (sparse, sparse[1:], SparseDraft(sparse.indices, sparse.probs)):
        back = pickle.loads(pickle.dumps(original))
        assert back.indices.dtype == torch.int32 and torch.equal(back.indices, original.indices)
        assert torch.equal(back.probs, original.probs)
        assert (back.raw is None) == (original.raw is None)
        if back.raw is not None:
            assert torch.equal(back.raw, original.raw)
        back.probs[0, 0] = 1.0  # writable: the verifier may pad into copies of it


def test_greedy_cascade_tokens_reject_mismatched_shapes():
    params = [CascadeParams(R.CHOW, 0.5)]
    p_raw = torch.full((1, 3, 5), 0.2)
    with pytest.raises(ValueError, match="draft_tokens and q_raw_drafted"):
        sampling.cascade_greedy_tokens(torch.zeros(1, 3, dtype=torch.long), p_raw,
                                       torch.ones(1, 2), params)  # q_raw for 2 positions, not 3
    with pytest.raises(ValueError, match="draft_tokens and q_raw_drafted"):
        sampling.cascade_greedy_tokens(torch.zeros(1, 2, dtype=torch.long), p_raw,
                                       torch.ones(1, 2), params)  # drafts and q_raw agree, p_raw not
