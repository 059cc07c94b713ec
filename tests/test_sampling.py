"""Tests for speccascade.sampling: parameters, logits processing, seeding and lossless verification.

The style follows vLLM's rejection-sampler tests: literal greedy cases, seeded determinism, a plain
loop-based reference implementation beside the vectorized one, and a statistical test that the
emitted tokens follow the target — with a stated tolerance — which demonstrably fails for
deliberately broken samplers. The cascade tests (test_cascade.py) reuse the statistical helpers.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

from speccascade import sampling
from speccascade.sampling import (DRAFT_STREAM, VERIFY_STREAM, ParamError, SamplingParams,
                                  process_logits, round_generator, sample,
                                  validate_num_draft_tokens, verify, verify_greedy)

# ---------------------------------------------------------------------------------------------
# A plain reference implementation: one row at a time, Python floats, straight from the paper
# (Leviathan et al. 2023, Algorithm 1), reading the same pre-drawn uniforms as the fast one:
# uniforms[b, i] tests draft i, uniforms[b, num_drafts[b]] picks the emitted token.
# ---------------------------------------------------------------------------------------------


def reference_pick(weights: list[float], u: float) -> int:
    """Inverse CDF over unnormalized weights: the first token whose cumulative weight exceeds
    u·total."""
    cumulative = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    threshold = u * total
    for v, c in enumerate(cumulative):
        if c > threshold:
            return v
    return max(v for v, w in enumerate(weights) if w > 0)


def reference_verify_row(drafts: list[int], q: list[list[float]], p: list[list[float]],
                         u: list[float]) -> list[int]:
    """Emitted tokens of one round: accepted drafts, then one recovered or bonus token."""
    n = len(drafts)
    emitted = []
    for i, x in enumerate(drafts):
        px, qx = p[i][x], q[i][x]
        accept_probability = min(1.0, px / qx) if qx > 0 else (1.0 if px > 0 else 0.0)
        if u[i] < accept_probability:
            emitted.append(x)
            continue
        residual = [max(0.0, pv - qv) for pv, qv in zip(p[i], q[i])]
        if sum(residual) <= 0:      # p == q: nothing left over, fall back to p
            residual = p[i]
        emitted.append(reference_pick(residual, u[n]))
        return emitted
    emitted.append(reference_pick(p[n], u[n]))   # all accepted: the bonus token
    return emitted


def reference_verify(draft_tokens, num_drafts, q, p, uniforms) -> list[list[int]]:
    rows = []
    for b in range(draft_tokens.shape[0]):
        n = int(num_drafts[b])
        rows.append(reference_verify_row(
            draft_tokens[b, :n].tolist(), q[b, :n].double().tolist(),
            p[b, :n + 1].double().tolist(), uniforms[b].tolist()))
    return rows


def emitted_lists(out: sampling.VerifyOutput) -> list[list[int]]:
    return [row[: int(n)].tolist() for row, n in zip(out.tokens, out.num_emitted)]


# ---------------------------------------------------------------------------------------------
# Statistical helpers (also used by test_cascade.py)
# ---------------------------------------------------------------------------------------------

ROUNDS = 200_000        # sampled rounds per distribution test
TV_MAX = 0.01           # total-variation tolerance per position
CHI2_LEVEL = 1e-3       # chi-square significance level per position


def random_distribution(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Dirichlet(1) rows [rows, vocab], drawn from the given generator."""
    weights = -torch.rand(rows, vocab, generator=gen, dtype=torch.float64).log()
    return weights / weights.sum(-1, keepdim=True)


def random_p_q(gamma: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed per-position p [γ+1, vocab] and q [γ, vocab], independent of the prefix.

    q is mostly p (acceptance ≈ 0.8, so deep positions still get many rounds) plus noise. The
    last token has p = 0 (drafting it must always be rejected) and token 0 has q = 0 (only the
    residual or the bonus can emit it).
    """
    p = random_distribution(gamma + 1, vocab, gen)
    p[:, -1] = 0
    p /= p.sum(-1, keepdim=True)
    q = 0.75 * p[:gamma] + 0.25 * random_distribution(gamma, vocab, gen)
    q[:, 0] = 0
    q /= q.sum(-1, keepdim=True)
    return p.float(), q.float()


def run_rounds(p_pos: torch.Tensor, q_pos: torch.Tensor, rounds: int,
               gen: torch.Generator) -> sampling.VerifyOutput:
    """Rounds as rows: drafts sampled from q at each position, verified against p_pos [γ+1, V]."""
    gamma, vocab = q_pos.shape
    if gamma:
        drafts = torch.multinomial(q_pos, rounds, replacement=True, generator=gen).T  # [rounds, γ]
    else:
        drafts = torch.zeros(rounds, 0, dtype=torch.long)
    uniforms = torch.rand(rounds, gamma + 1, generator=gen, dtype=torch.float64)
    return sampling._verify_with_uniforms(
        drafts.contiguous(), torch.full((rounds,), gamma),
        q_pos.expand(rounds, gamma, vocab), p_pos.expand(rounds, gamma + 1, vocab), uniforms)


def position_checks(out: sampling.VerifyOutput, target: torch.Tensor) -> list[dict]:
    """Per position j: does the token emitted at j follow target[j] [γ+1, V]?

    Losslessness says: the first emitted token follows target[0]; conditionally on the first j
    drafts being accepted (num_accepted ≥ j), the token emitted at position j — an accepted draft,
    the recovered token or the bonus — follows target[j]. With per-position distributions that do
    not depend on the prefix, that is the whole claim.
    """
    checks = []
    vocab = target.shape[-1]
    for j in range(target.shape[0]):
        reached = out.num_accepted >= j
        counts = torch.bincount(out.tokens[reached, j], minlength=vocab).double()
        n = counts.sum().item()
        expected = target[j].double() / target[j].double().sum()
        tv = 0.5 * (counts / n - expected).abs().sum().item()
        support = expected > 0
        if counts[~support].sum() > 0:
            p_value = 0.0                       # emitted a token the target gives zero mass
        else:
            p_value = stats.chisquare(counts[support].numpy(),
                                      (n * expected[support]).numpy()).pvalue
        checks.append(dict(position=j, rounds=int(n), tv=tv, p_value=float(p_value),
                           ok=tv <= TV_MAX and p_value >= CHI2_LEVEL))
    return checks


def follows(out: sampling.VerifyOutput, target: torch.Tensor) -> bool:
    return all(c["ok"] for c in position_checks(out, target))


# ---------------------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_p=-0.5), "top_p"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ParamError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)


def test_range_is_in_the_message():
    with pytest.raises(ParamError, match=r"\(0, 1\]"):
        SamplingParams(top_p=2.0)
    with pytest.raises(ParamError, match=">= 0"):
        SamplingParams(temperature=-1.0)


def test_good_sampling_params():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=3).greedy
    SamplingParams(temperature=0, top_k=0, top_p=1.0)


@pytest.mark.parametrize("n", [0, -1, 9])
def test_bad_num_draft_tokens(n):
    with pytest.raises(ParamError, match=r"\[1, 8\]") as err:
        validate_num_draft_tokens(n, maximum=8)
    assert err.value.field == "num_draft_tokens"


def test_good_num_draft_tokens():
    validate_num_draft_tokens(1, 8)
    validate_num_draft_tokens(8, 8)


# ---------------------------------------------------------------------------------------------
# Logits processing: temperature, top-k, top-p, greedy
# ---------------------------------------------------------------------------------------------


def one_row(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, None, :]   # [1, 1, vocab]


def test_temperature_scales_logits():
    logits = one_row([0.0, math.log(2.0)])
    probs = process_logits(logits, [SamplingParams(temperature=0.5)])
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.2, 0.8]))
    probs = process_logits(logits, [SamplingParams(temperature=1.0)])
    torch.testing.assert_close(probs[0, 0], torch.tensor([1 / 3, 2 / 3]))


def test_top_k_keeps_ties_at_the_boundary():
    logits = one_row([1.0, 3.0, 2.0, 3.0, 0.0])
    probs = process_logits(logits, [SamplingParams(temperature=1.0, top_k=2)])
    torch.testing.assert_close(probs[0, 0], torch.tensor([0, 0.5, 0, 0.5, 0]))
    probs = process_logits(logits, [SamplingParams(temperature=1.0, top_k=1)])
    torch.testing.assert_close(probs[0, 0], torch.tensor([0, 0.5, 0, 0.5, 0]))
    probs = process_logits(logits, [SamplingParams(temperature=1.0, top_k=3)])
    e = math.e
    torch.testing.assert_close(probs[0, 0], torch.tensor([0, e, 1, e, 0]) / (2 * e + 1))
    probs = process_logits(logits, [SamplingParams(temperature=1.0, top_k=100)])   # > vocab: off
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = one_row([math.log(x) for x in (0.5, 0.25, 0.15, 0.1)])
    cases = {0.3: [1, 0, 0, 0],
             0.7: [2 / 3, 1 / 3, 0, 0],
             0.8: [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0],
             1.0: [0.5, 0.25, 0.15, 0.1]}
    for top_p, expected in cases.items():
        probs = process_logits(logits, [SamplingParams(temperature=1.0, top_p=top_p)])
        torch.testing.assert_close(probs[0, 0], torch.tensor(expected, dtype=torch.float32),
                                   msg=f"top_p={top_p}")


def test_top_k_comes_before_top_p():
    logits = one_row([math.log(x) for x in (0.4, 0.3, 0.2, 0.1)])
    # top-k = 2 leaves (4/7, 3/7); 4/7 ≥ 0.5 so top-p keeps only token 0.
    # (top-p first, on the original 0.4, 0.3, ..., would keep two tokens.)
    probs = process_logits(logits, [SamplingParams(temperature=1.0, top_k=2, top_p=0.5)])
    torch.testing.assert_close(probs[0, 0], torch.tensor([1.0, 0, 0, 0]))


def test_greedy_is_one_hot_at_the_first_argmax():
    logits = torch.tensor([[[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 0.0]]])   # [1, 2, 4]
    probs = process_logits(logits, [SamplingParams(temperature=0.0, top_k=3, top_p=0.5)])
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[[0.0, 1, 0, 0], [1, 0, 0, 0]]]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
       top_k=st.integers(0, 10), top_p=st.sampled_from([0.05, 0.5, 0.9, 1.0]))
def test_processing_is_per_row_and_identical_for_p_and_q(seed, temperature, top_k, top_p):
    """The same function and parameters process p and q: a row's result does not depend on the
    other rows or their parameters, and it is a distribution supported inside the top-k set."""
    gen = torch.Generator().manual_seed(seed)
    target_logits = 3 * torch.randn(1, 3, 8, generator=gen)
    draft_logits = 3 * torch.randn(1, 3, 8, generator=gen)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    other = SamplingParams(temperature=0.9, top_k=2, top_p=0.7)
    both = process_logits(torch.cat([target_logits, draft_logits, target_logits]),
                          [params, params, other])
    p = process_logits(target_logits, [params])
    q = process_logits(draft_logits, [params])
    assert torch.equal(both[0:1], p) and torch.equal(both[1:2], q)
    for probs, logits in ((p, target_logits), (q, draft_logits)):
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 3))
        if top_k:
            kth = logits.topk(min(top_k, 8), -1).values[..., -1:]
            assert (probs[logits < kth] == 0).all()


# ---------------------------------------------------------------------------------------------
# Seeded generators and plain sampling
# ---------------------------------------------------------------------------------------------


def test_round_generator_is_a_function_of_seed_position_stream():
    def draws(*args):
        return torch.rand(4, generator=round_generator(*args))

    assert torch.equal(draws(7, 100, VERIFY_STREAM), draws(7, 100, VERIFY_STREAM))
    assert not torch.equal(draws(7, 100, VERIFY_STREAM), draws(7, 100, DRAFT_STREAM))
    assert not torch.equal(draws(7, 100, VERIFY_STREAM), draws(7, 101, VERIFY_STREAM))
    assert not torch.equal(draws(7, 100, VERIFY_STREAM), draws(8, 100, VERIFY_STREAM))


def test_sample_draws_exactly_one_uniform_per_row():
    probs = torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0]])
    used = [round_generator(1, 0, VERIFY_STREAM), round_generator(2, 0, VERIFY_STREAM)]
    tokens = sample(probs, used)
    assert tokens.dtype == torch.int64 and tokens[1] == 0
    for seed, g in zip((1, 2), used):
        fresh = round_generator(seed, 0, VERIFY_STREAM)
        torch.rand(1, generator=fresh, dtype=torch.float64)
        assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=fresh))


def test_sample_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(2000, 5)
    tokens = sample(probs, [round_generator(0, i, VERIFY_STREAM) for i in range(2000)])
    assert set(tokens.tolist()) == {1, 3}


# ---------------------------------------------------------------------------------------------
# Greedy verification: literal cases
# ---------------------------------------------------------------------------------------------

VOCAB = 5


def one_hot_targets(rows: list[list[int]]) -> torch.Tensor:
    """argmax tokens per row and position -> one-hot p [batch, γmax + 1, VOCAB]."""
    return torch.nn.functional.one_hot(torch.tensor(rows), VOCAB).float()


def test_greedy_all_accepted_with_bonus():
    p = one_hot_targets([[3, 1, 4, 0]])
    out = verify_greedy(torch.tensor([[3, 1, 4]]), torch.tensor([3]), p)
    assert out.num_accepted.tolist() == [3]
    assert out.num_emitted.tolist() == [4]
    assert out.tokens.tolist() == [[3, 1, 4, 0]]


def test_greedy_early_mismatch():
    p = one_hot_targets([[3, 1, 4, 0], [3, 1, 4, 0]])
    out = verify_greedy(torch.tensor([[3, 2, 4], [0, 1, 4]]), torch.tensor([3, 3]), p)
    assert out.num_accepted.tolist() == [1, 0]
    assert out.tokens.tolist() == [[3, 1, -1, -1], [3, -1, -1, -1]]


def test_greedy_several_sequences_with_different_gamma():
    p = one_hot_targets([[3, 1, 4, 0], [2, 2, 2, 2], [4, 0, 0, 0], [1, 3, 0, 0]])
    drafts = torch.tensor([[3, 1, 4],
                           [2, 9, 9],     # γ = 1; the 9s are padding and must be ignored
                           [4, 4, 4],     # γ = 0: plain greedy step from p[:, 0]
                           [1, 2, 0]])    # γ = 2, mismatch at the second draft
    out = verify_greedy(drafts, torch.tensor([3, 1, 0, 2]), p)
    assert out.num_accepted.tolist() == [3, 1, 0, 1]
    assert out.tokens.tolist() == [[3, 1, 4, 0],
                                   [2, 2, -1, -1],
                                   [4, -1, -1, -1],
                                   [1, 3, -1, -1]]


def test_greedy_accepts_logits_too():
    logits = torch.tensor([[[0.0, 1.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]]])
    out = verify_greedy(torch.tensor([[2]]), torch.tensor([1]), logits)
    assert out.tokens.tolist() == [[2, 0]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_sampled_verify_on_one_hot_equals_greedy(seed):
    """Temperature 0 through the sampled path: one-hot p and q give exactly verify_greedy."""
    gen = torch.Generator().manual_seed(seed)
    batch, gamma, vocab = 6, 4, 3          # a small vocabulary makes agreements frequent
    greedy = [SamplingParams()] * batch
    target_logits = torch.randn(batch, gamma + 1, vocab, generator=gen)
    draft_logits = torch.randn(batch, gamma, vocab, generator=gen)
    p = process_logits(target_logits, greedy)
    q = process_logits(draft_logits, greedy)
    drafts = q.argmax(-1)                                   # what a greedy drafter proposes
    num_drafts = torch.randint(0, gamma + 1, (batch,), generator=gen)
    generators = [round_generator(seed, b, VERIFY_STREAM) for b in range(batch)]
    sampled = verify(drafts, num_drafts, q, p, generators)
    expected = verify_greedy(drafts, num_drafts, target_logits)
    assert torch.equal(sampled.num_accepted, expected.num_accepted)
    assert torch.equal(sampled.tokens, expected.tokens)


# ---------------------------------------------------------------------------------------------
# Sampled verification: reference cross-check, determinism, generator consumption
# ---------------------------------------------------------------------------------------------


def random_verify_inputs(gen: torch.Generator, batch: int, gamma_max: int, vocab: int):
    """Random ragged inputs with zeros in p and q, drafts sometimes off q's support, p == q rows
    (nothing left in the residual) and unnormalized p ≤ q rows (the degenerate-residual
    fallback)."""
    def dist(*shape):
        d = torch.rand(*shape, generator=gen)
        d = d * (torch.rand(*shape, generator=gen) > 0.3)        # some exact zeros
        d[..., 0] += 1e-3                                        # never an all-zero row
        return d / d.sum(-1, keepdim=True)

    p = dist(batch, gamma_max + 1, vocab)
    q = dist(batch, gamma_max, vocab)
    kind = torch.randint(0, 4, (batch,), generator=gen)
    p[kind == 1, :gamma_max] = q[kind == 1]                      # p == q: always accepted
    p[kind == 2, :gamma_max] = q[kind == 2] / 2                  # p ≤ q: residual falls back to p
    drafts = torch.randint(0, vocab, (batch, gamma_max), generator=gen)
    if gamma_max:
        from_q = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(batch, gamma_max)
        drafts = torch.where(kind[:, None] == 3, drafts, from_q)  # kind 3: arbitrary drafts
    num_drafts = torch.randint(0, gamma_max + 1, (batch,), generator=gen)
    return drafts, num_drafts, q, p


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 8), gamma_max=st.integers(0, 5),
       vocab=st.integers(2, 8))
def test_vectorized_matches_loop_reference(seed, batch, gamma_max, vocab):
    gen = torch.Generator().manual_seed(seed)
    drafts, num_drafts, q, p = random_verify_inputs(gen, batch, gamma_max, vocab)
    uniforms = torch.rand(batch, gamma_max + 1, generator=gen, dtype=torch.float64)
    out = sampling._verify_with_uniforms(drafts, num_drafts, q, p, uniforms)
    assert emitted_lists(out) == reference_verify(drafts, num_drafts, q, p, uniforms)
    # padding: -1 after the emitted token
    for row, n in zip(out.tokens, out.num_emitted):
        assert (row[int(n):] == -1).all() and (row[: int(n)] >= 0).all()


def test_verify_draws_its_uniforms_from_the_generators_in_order():
    """verify == the helper fed with num_drafts[b] acceptance uniforms then one emission uniform,
    and afterwards each generator has advanced by exactly num_drafts[b] + 1 draws."""
    gen = torch.Generator().manual_seed(11)
    drafts, _, q, p = random_verify_inputs(gen, 4, 3, 6)
    num_drafts = torch.tensor([3, 0, 2, 1])
    generators = [round_generator(5, 40 + b, VERIFY_STREAM) for b in range(4)]
    out = verify(drafts, num_drafts, q, p, generators)

    uniforms = torch.zeros(4, 4, dtype=torch.float64)
    for b, n in enumerate(num_drafts.tolist()):
        fresh = round_generator(5, 40 + b, VERIFY_STREAM)
        uniforms[b, : n + 1] = torch.rand(n + 1, generator=fresh, dtype=torch.float64)
        assert torch.equal(torch.rand(2, generator=generators[b]), torch.rand(2, generator=fresh))
    expected = sampling._verify_with_uniforms(drafts, num_drafts, q, p, uniforms)
    assert torch.equal(out.tokens, expected.tokens)


def test_seeded_verify_is_deterministic_across_repeats():
    gen = torch.Generator().manual_seed(3)
    drafts, num_drafts, q, p = random_verify_inputs(gen, 8, 4, 10)

    def run():
        generators = [round_generator(1234, 77, VERIFY_STREAM) for _ in range(8)]
        return verify(drafts, num_drafts, q, p, generators)

    first, second = run(), run()
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.num_accepted, second.num_accepted)


def test_seeded_verify_does_not_depend_on_batch_companions():
    """Row 0 with the same inputs and generator gives the same output alone, next to different
    companions (other γ, other vocab content, other seeds) and at a different batch index."""
    gen = torch.Generator().manual_seed(4)
    gamma_max, vocab = 4, 10
    drafts, num_drafts, q, p = random_verify_inputs(gen, 1, gamma_max, vocab)
    num_drafts[0] = gamma_max

    def row_zero_output(companions: int, index: int, companion_seed: int):
        c_drafts, c_num, c_q, c_p = random_verify_inputs(
            torch.Generator().manual_seed(companion_seed), companions, gamma_max, vocab)
        batch_drafts = torch.cat([c_drafts[:index], drafts, c_drafts[index:]])
        batch_num = torch.cat([c_num[:index], num_drafts, c_num[index:]])
        batch_q = torch.cat([c_q[:index], q, c_q[index:]])
        batch_p = torch.cat([c_p[:index], p, c_p[index:]])
        generators = [round_generator(companion_seed * 100 + i, 9, VERIFY_STREAM)
                      for i in range(companions + 1)]
        generators[index] = round_generator(42, 9, VERIFY_STREAM)
        out = verify(batch_drafts, batch_num, batch_q, batch_p, generators)
        return out.tokens[index], out.num_accepted[index]

    alone = row_zero_output(0, 0, 0)
    for companions, index, companion_seed in [(1, 1, 1), (5, 0, 2), (7, 3, 3)]:
        tokens, accepted = row_zero_output(companions, index, companion_seed)
        assert torch.equal(tokens, alone[0]) and accepted == alone[1]


def test_different_seeds_give_different_outputs():
    gen = torch.Generator().manual_seed(5)
    drafts, num_drafts, q, p = random_verify_inputs(gen, 1, 0, 16)
    outputs = {tuple(verify(drafts, num_drafts, q, p, [round_generator(s, 0, VERIFY_STREAM)])
                     .tokens[0].tolist()) for s in range(30)}
    assert len(outputs) > 3


def test_degenerate_residual_falls_back_to_p():
    """p ≤ q everywhere (here p = q/2, unnormalized): max(0, p − q) is all zero; emit from p."""
    q = torch.tensor([[[0.5, 0.5, 0.0]]])
    p = torch.tensor([[[0.25, 0.25, 0.0], [0.0, 0.0, 1.0]]])
    drafts = torch.tensor([[0]])
    uniforms = torch.tensor([[0.9, 0.75]], dtype=torch.float64)   # reject (0.9 ≥ 0.5), pick 75 %
    out = sampling._verify_with_uniforms(drafts, torch.tensor([1]), q, p, uniforms)
    assert out.num_accepted.tolist() == [0]
    assert out.tokens.tolist() == [[1, -1]]


# ---------------------------------------------------------------------------------------------
# Distribution: the emitted tokens follow p (and the same check rejects broken samplers)
# ---------------------------------------------------------------------------------------------

VOCAB_STAT = 16


def broken_residual_is_p(monkeypatch):
    monkeypatch.setattr(sampling, "_residual", lambda p, q: p.double())


def broken_acceptance_q_over_p(monkeypatch):
    correct = sampling._acceptance_probability
    monkeypatch.setattr(sampling, "_acceptance_probability", lambda p_x, q_x: correct(q_x, p_x))


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_emitted_tokens_follow_p(gamma):
    gen = torch.Generator().manual_seed(100 + gamma)
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    out = run_rounds(p, q, ROUNDS, gen)
    checks = position_checks(out, p)
    assert all(c["ok"] for c in checks), checks
    # every position was reached often and the rounds exercised rejections and bonuses
    assert min(c["rounds"] for c in checks) > 50_000
    assert (out.num_accepted < gamma).any() and (out.num_accepted == gamma).any()


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("breakage", [broken_residual_is_p, broken_acceptance_q_over_p])
def test_the_same_check_rejects_a_broken_sampler(gamma, breakage, monkeypatch):
    gen = torch.Generator().manual_seed(100 + gamma)    # the same p, q and draws as above
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    breakage(monkeypatch)
    out = run_rounds(p, q, ROUNDS, gen)
    checks = position_checks(out, p)
    assert not all(c["ok"] for c in checks), checks


def test_plain_sampling_with_zero_drafts_follows_p():
    """γ = 0 rows: verify is plain sampling from p[:, 0]."""
    gen = torch.Generator().manual_seed(9)
    p, _ = random_p_q(0, VOCAB_STAT, gen)
    out = run_rounds(p, torch.zeros(0, VOCAB_STAT), ROUNDS // 2, gen)
    assert out.num_accepted.eq(0).all()
    assert follows(out, p)


# ---------------------------------------------------------------------------------------------
# Sparse draft distributions: the drafter samples from q′ = top-k of q (renormalized) and ships
# (indices, probs); the verifier must test against exactly that q′ (REFERENCE.md §2)
# ---------------------------------------------------------------------------------------------

SPARSE_K = 5  # of VOCAB_STAT = 16 tokens: q′ drops a large share of q's mass


def test_truncate_top_k_keeps_the_likeliest_and_renormalizes():
    q = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    indices, probs = sampling.truncate_top_k(q, 3)
    assert indices.dtype == torch.int32 and indices.tolist() == [[1, 3, 4]]
    assert torch.allclose(probs, torch.tensor([[0.4, 0.3, 0.15]]) / 0.85)
    dense = sampling.sparse_to_dense(indices, probs, 5)
    assert torch.allclose(dense, torch.tensor([[0, 0.4, 0, 0.3, 0.15]]) / 0.85)
    assert sampling.truncate_top_k(q, 99)[0].shape == (1, 5)      # k is capped at the vocabulary


def test_sparse_to_dense_adds_padding_without_overwriting():
    # two rows of one batch padded to k = 3: padded slots carry index 0 with probability 0
    indices = torch.tensor([[[0, 2, 1]], [[2, 0, 0]]])             # [batch, 1, k]
    probs = torch.tensor([[[0.5, 0.3, 0.2]], [[1.0, 0.0, 0.0]]])
    dense = sampling.sparse_to_dense(indices, probs, 3)            # [batch, 1, vocab]
    assert torch.equal(dense, torch.tensor([[[0.5, 0.2, 0.3]], [[0.0, 0.0, 1.0]]]))


def drafter_q_prime(q: torch.Tensor, k: int):
    """The real drafter (DraftWorker._sample) at temperature 1 on logits log q [γ, V]: one row per
    position. -> (its tokens [γ], the SparseDraft it ships)."""
    from speccascade.engine.seam import DraftRequest, SparseDraft
    from speccascade.engine.workers import DraftWorker

    gamma = q.shape[0]
    requests = [DraftRequest("s", [], 1, SamplingParams(temperature=1.0, seed=7), position=j,
                             ship_top_k=k) for j in range(gamma)]
    tokens, rows = DraftWorker._sample(q.log()[:, None, :], requests, step=0)
    indices, probs, _ = zip(*rows)
    return tokens, SparseDraft(torch.stack(indices), torch.stack(probs))


def verifier_q(sparse, drafts: torch.Tensor, vocab: int) -> torch.Tensor:
    """The real verifier's sparse → dense q (VerifyWorker._draft_probs) -> [γ, V]."""
    from speccascade.engine.seam import VerifyRequest
    from speccascade.engine.workers import VerifyWorker

    request = VerifyRequest("s", [1], drafts.tolist(), SamplingParams(temperature=1.0), sparse)
    return VerifyWorker._draft_probs([request], drafts[None], len(drafts), vocab)[0]


def test_drafter_ships_exactly_the_q_prime_it_samples_from():
    gen = torch.Generator().manual_seed(31)
    _, q = random_p_q(4, VOCAB_STAT, gen)
    tokens, sparse = drafter_q_prime(q, SPARSE_K)
    assert sparse.indices.shape == sparse.probs.shape == (4, SPARSE_K)
    expected = sampling.sparse_to_dense(*sampling.truncate_top_k(q, SPARSE_K), VOCAB_STAT)
    dense = verifier_q(sparse, tokens, VOCAB_STAT)
    assert torch.allclose(dense, expected, atol=1e-6)              # q′ = top-k of q, renormalized
    # the verifier's q′ is the shipped tensor bit for bit, and nothing outside it
    assert torch.equal(dense.gather(-1, sparse.indices.long()), sparse.probs)
    assert dense.scatter(-1, sparse.indices.long(), 0.0).eq(0).all()
    assert (dense.gather(-1, tokens[:, None]) > 0).all()           # every draft lies in q′


def test_drafter_tokens_follow_q_prime_not_q():
    """Many draws of the real drafter (one seeded row each) follow q′; the check tells q′ from q."""
    gen = torch.Generator().manual_seed(32)
    _, q = random_p_q(1, VOCAB_STAT, gen)
    n = 40_000
    from speccascade.engine.seam import DraftRequest
    from speccascade.engine.workers import DraftWorker

    requests = [DraftRequest("s", [], 1, SamplingParams(temperature=1.0, seed=s), position=0,
                             ship_top_k=SPARSE_K) for s in range(n)]
    tokens, _ = DraftWorker._sample(q.log().expand(n, 1, VOCAB_STAT), requests, step=0)
    q_prime = sampling.sparse_to_dense(*sampling.truncate_top_k(q, SPARSE_K), VOCAB_STAT)
    as_rounds = sampling.VerifyOutput(torch.zeros(n, dtype=torch.long), tokens[:, None])
    assert follows(as_rounds, q_prime)
    assert not follows(as_rounds, q)


def run_sparse_rounds(p: torch.Tensor, q: torch.Tensor, verifier_side: str,
                      gen: torch.Generator) -> sampling.VerifyOutput:
    """Drafts from the drafter's q′ (top-SPARSE_K), verified against the q `verifier_side` names:
    "shipped" (the real verifier on the real payload), "untruncated" (q), "other_k" (q′ of k+1)."""
    drafts, sparse = drafter_q_prime(q, SPARSE_K)
    q_prime = verifier_q(sparse, drafts, VOCAB_STAT)               # what the drafter sampled from
    if verifier_side == "shipped":
        q_verify = q_prime
    elif verifier_side == "untruncated":
        q_verify = q
    else:
        q_verify = verifier_q(drafter_q_prime(q, SPARSE_K + 1)[1], drafts, VOCAB_STAT)
    gamma = q.shape[0]
    sampled = torch.multinomial(q_prime, ROUNDS, replacement=True, generator=gen).T  # [rounds, γ]
    uniforms = torch.rand(ROUNDS, gamma + 1, generator=gen, dtype=torch.float64)
    return sampling._verify_with_uniforms(
        sampled.contiguous(), torch.full((ROUNDS,), gamma), q_verify.expand(ROUNDS, gamma, -1),
        p.expand(ROUNDS, gamma + 1, -1), uniforms)


@pytest.mark.parametrize("gamma", [1, 3])
def test_sparse_drafts_verified_against_the_shipped_q_prime_follow_p(gamma):
    gen = torch.Generator().manual_seed(300 + gamma)
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    out = run_sparse_rounds(p, q, "shipped", gen)
    checks = position_checks(out, p)
    assert all(c["ok"] for c in checks), checks
    assert (out.num_accepted < gamma).any() and (out.num_accepted == gamma).any()


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("verifier_side", ["untruncated", "other_k"])
def test_sparse_check_fails_when_the_verifier_uses_another_q(gamma, verifier_side):
    gen = torch.Generator().manual_seed(300 + gamma)               # the same p, q and draws
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    out = run_sparse_rounds(p, q, verifier_side, gen)
    assert not follows(out, p), position_checks(out, p)
