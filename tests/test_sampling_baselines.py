"""The lossy baselines cascades are compared with, in the same sampler (REFERENCE.md §15):

- lossy speculative decoding with lenience l (Leviathan et al. 2023, App. A.5), and
- truncation sampling of the target (min-p, η-sampling) verified losslessly.

Same practice as test_sampling.py: plain loop references beside the vectorized code, literal
cases, and statistical tests with the stated tolerances of test_sampling (200 000 rounds, TV ≤ 0.01
and chi-square at 1e-3 per position) against each baseline's exact distribution, computed here from
its closed form in Python floats. Each statistical test has a companion in which the same check
fails on a deliberately broken variant.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from test_sampling import (ROUNDS, VOCAB_STAT, emitted_lists, follows, position_checks,
                           random_p_q, random_verify_inputs, reference_pick)

from speccascade import sampling
from speccascade.engine.engine import Engine
from speccascade.engine.loop import GenerationRequest, Mode
from speccascade.sampling import (VERIFY_STREAM, ParamError, SamplingParams, round_generator,
                                  truncate_target, verify)

# ---------------------------------------------------------------------------------------------
# Plain references: one row at a time, Python floats, straight from the definitions
# ---------------------------------------------------------------------------------------------


def reference_lenient_row(drafts: list[int], q: list[list[float]], p: list[list[float]],
                          u: list[float], lenience: float) -> list[int]:
    """One round of lossy SD: accept with min(1, p/(l·q)), recover from norm(max(0, p − q))."""
    n = len(drafts)
    emitted = []
    for i, x in enumerate(drafts):
        px, lqx = p[i][x], lenience * q[i][x]
        accept_probability = min(1.0, px / lqx) if lqx > 0 else (1.0 if px > 0 else 0.0)
        if u[i] < accept_probability:
            emitted.append(x)
            continue
        residual = [max(0.0, pv - qv) for pv, qv in zip(p[i], q[i])]
        if sum(residual) <= 0:
            residual = p[i]
        emitted.append(reference_pick(residual, u[n]))
        return emitted
    emitted.append(reference_pick(p[n], u[n]))
    return emitted


def lossy_target(p: list[float], q: list[float], lenience: float) -> list[float]:
    """The closed form f_l(v) = min(q, p/l) + (1 − Σ min(q, p/l))·norm(max(0, p − q))(v)."""
    accepted = [min(qv, pv / lenience) for pv, qv in zip(p, q)]
    residual = [max(0.0, pv - qv) for pv, qv in zip(p, q)]
    rejected, total = 1.0 - sum(accepted), sum(residual)
    return [a + rejected * r / total for a, r in zip(accepted, residual)]


def reference_truncate(p: list[float], min_p: float, eta: float) -> list[float]:
    """Keep p(v) ≥ max(min_p·max p, min(η, √η·e^(−H(p)))) (each term when set), renormalize."""
    top = max(p)
    threshold = min_p * top
    if eta > 0:
        entropy = -sum(x * math.log(x) for x in p if x > 0)
        threshold = max(threshold, min(eta, math.sqrt(eta) * math.exp(-entropy)))
    kept = [x if x >= threshold or x == top else 0.0 for x in p]
    return [x / sum(kept) for x in kept]


def expected_table(rows: torch.Tensor, fn) -> torch.Tensor:
    """fn applied to each row of rows [n, V] in Python floats -> [n, V] float64."""
    return torch.tensor([fn(row) for row in rows.double().tolist()], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(lenience=0.0), "lenience", r"\(0, 1\]"),
    (dict(lenience=1.5), "lenience", r"\(0, 1\]"),
    (dict(lenience=math.nan), "lenience", r"\(0, 1\]"),
    (dict(lenience=True), "lenience", r"\(0, 1\]"),
    (dict(min_p=1.0), "min_p", r"\[0, 1\)"),
    (dict(min_p=-0.1), "min_p", r"\[0, 1\)"),
    (dict(min_p=math.inf), "min_p", r"\[0, 1\)"),
    (dict(eta=1.0), "eta", r"\[0, 1\)"),
    (dict(eta=-1e-4), "eta", r"\[0, 1\)"),
    (dict(eta=math.nan), "eta", r"\[0, 1\)"),
])
def test_bad_baseline_params_name_the_field_and_range(kwargs, field, allowed):
    with pytest.raises(ParamError, match=allowed) as err:
        SamplingParams(temperature=1.0, **kwargs)
    assert err.value.field == field and field in str(err.value)


def test_good_baseline_params():
    s = SamplingParams(temperature=0.8, min_p=0.1, eta=3e-4, lenience=0.5)
    assert s.truncates and not SamplingParams(temperature=0.8).truncates
    assert SamplingParams().lenience == 1.0 and SamplingParams(lenience=1).lenience == 1


@pytest.mark.parametrize("mode, fields, field", [
    (Mode.TARGET, dict(lenience=0.5), "lenience"),
    (Mode.DRAFT, dict(lenience=0.5), "lenience"),
    (Mode.CASCADE, dict(lenience=0.5), "lenience"),
    (Mode.DRAFT, dict(min_p=0.1), "min_p"),
    (Mode.CASCADE, dict(min_p=0.1), "min_p"),
    (Mode.DRAFT, dict(eta=1e-3), "eta"),
    (Mode.CASCADE, dict(eta=1e-3), "eta"),
])
def test_options_a_mode_does_not_take_are_refused(mode, fields, field):
    with pytest.raises(ParamError, match=field) as err:
        GenerationRequest("r", [1], 4, mode=mode, sampling=SamplingParams(1.0, **fields))
    assert err.value.field == field and mode.name in err.value.message


def test_options_the_modes_take_are_accepted():
    GenerationRequest("r", [1], 4, mode=Mode.SPECULATIVE,
                      sampling=SamplingParams(1.0, lenience=0.5, min_p=0.1, eta=1e-3))
    GenerationRequest("r", [1], 4, mode=Mode.TARGET, sampling=SamplingParams(1.0, min_p=0.1))
    for mode in Mode:  # lenience 1 is lossless: no mode refuses it
        GenerationRequest("r", [1], 4, mode=mode, sampling=SamplingParams(1.0, lenience=1.0))


# ---------------------------------------------------------------------------------------------
# Truncation: literal cases and the reference
# ---------------------------------------------------------------------------------------------


def trunc(p: list[float], **params) -> list[float]:
    out = truncate_target(torch.tensor([[p]]), [SamplingParams(temperature=1.0, **params)])
    return out[0, 0].tolist()


def test_min_p_keeps_tokens_at_least_min_p_of_the_top():
    p = [0.5, 0.3, 0.15, 0.05]
    assert trunc(p, min_p=0.2) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert trunc(p, min_p=0.3) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert trunc(p, min_p=0.61) == pytest.approx([1.0, 0, 0, 0])
    assert trunc(p, min_p=0.6) == pytest.approx([0.625, 0.375, 0, 0])  # p = 0.6·max p: kept


def test_eta_threshold_is_min_of_eta_and_sqrt_eta_times_exp_minus_entropy():
    p = [0.5, 0.3, 0.15, 0.05]
    entropy = -sum(x * math.log(x) for x in p)                        # 1.1423 nats
    # η = 0.1: ε = min(0.1, 0.316·0.319 = 0.101) = 0.1, drops 0.05
    assert min(0.1, math.sqrt(0.1) * math.exp(-entropy)) == 0.1
    assert trunc(p, eta=0.1) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    # η = 0.5: ε = min(0.5, 0.707·0.319 = 0.226) = 0.226, the entropy term binds: drops 0.15 too
    assert trunc(p, eta=0.5) == pytest.approx([0.625, 0.375, 0, 0])
    # both set: a token must pass both thresholds
    assert trunc(p, eta=0.1, min_p=0.5) == pytest.approx([0.625, 0.375, 0, 0])


def test_truncation_leaves_untouched_rows_and_one_hot_rows_alone():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, 2, 9, generator=gen), -1)        # [batch, k, vocab]
    params = [SamplingParams(1.0), SamplingParams(1.0, min_p=0.5), SamplingParams(0.7)]
    out = truncate_target(p, params)
    assert torch.equal(out[0], p[0]) and torch.equal(out[2], p[2])    # bit for bit
    assert not torch.equal(out[1], p[1])
    assert truncate_target(p, [SamplingParams(1.0)] * 3) is p         # nothing to do
    one_hot = torch.nn.functional.one_hot(torch.tensor([[4]]), 9).float()
    assert torch.equal(truncate_target(one_hot, [SamplingParams(0.0, min_p=0.9, eta=0.5)]),
                       one_hot)                                       # greedy: unchanged


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), vocab=st.integers(1, 12),
       min_p=st.sampled_from([0.0, 0.05, 0.3, 0.9, 0.999]),
       eta=st.sampled_from([0.0, 3e-4, 0.02, 0.3, 0.99]), sharp=st.sampled_from([0.3, 1.0, 5.0]))
def test_truncate_target_matches_the_reference(seed, vocab, min_p, eta, sharp):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(sharp * torch.randn(2, 3, vocab, generator=gen), -1)
    p[0, 0] = 0
    p[0, 0, vocab // 2] = 1                                          # a one-hot row
    out = truncate_target(p, [SamplingParams(1.0, min_p=min_p, eta=eta)] * 2)
    expected = torch.tensor([[reference_truncate(row, min_p, eta) for row in rows]
                             for rows in p.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    assert (out.gather(-1, p.argmax(-1, keepdim=True)) > 0).all()  # the argmax always survives
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------
# Lenience: l = 1 is the lossless path, the vectorized sampler matches the reference
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 6), gamma_max=st.integers(0, 4),
       vocab=st.integers(2, 8))
def test_lenience_one_is_the_lossless_path_bit_for_bit(seed, batch, gamma_max, vocab):
    gen = torch.Generator().manual_seed(seed)
    drafts, num_drafts, q, p = random_verify_inputs(gen, batch, gamma_max, vocab)

    def generators():
        return [round_generator(seed, b, VERIFY_STREAM) for b in range(batch)]

    lossless = verify(drafts, num_drafts, q, p, generators())
    ones = verify(drafts, num_drafts, q, p, generators(), torch.ones(batch, dtype=torch.float64))
    assert torch.equal(ones.tokens, lossless.tokens)
    assert torch.equal(ones.num_accepted, lossless.num_accepted)
    p_x, q_x = p[:, 0], torch.cat([q, p[:, :1]], 1)[:, 0]            # [batch, vocab] values
    assert torch.equal(sampling._acceptance_probability(p_x, 1.0 * q_x.double()),
                       sampling._acceptance_probability(p_x, q_x))   # the same numbers exactly


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 8), gamma_max=st.integers(0, 5),
       vocab=st.integers(2, 8))
def test_lenient_vectorized_matches_loop_reference(seed, batch, gamma_max, vocab):
    gen = torch.Generator().manual_seed(seed)
    drafts, num_drafts, q, p = random_verify_inputs(gen, batch, gamma_max, vocab)
    uniforms = torch.rand(batch, gamma_max + 1, generator=gen, dtype=torch.float64)
    lenience = torch.tensor([0.05, 0.3, 0.5, 0.9, 1.0, 1e-6, 0.7, 0.2][:batch],
                            dtype=torch.float64)
    out = sampling._verify_with_uniforms(drafts, num_drafts, q, p, uniforms, lenience)
    expected = []
    for b in range(batch):
        n = int(num_drafts[b])
        expected.append(reference_lenient_row(
            drafts[b, :n].tolist(), q[b, :n].double().tolist(), p[b, :n + 1].double().tolist(),
            uniforms[b].tolist(), float(lenience[b])))
    assert emitted_lists(out) == expected


def test_lenience_accepts_more_and_never_less():
    gen = torch.Generator().manual_seed(8)
    p, q = random_p_q(4, VOCAB_STAT, gen)
    accepted = [run_lenient_rounds(p, q, l, 20_000, torch.Generator().manual_seed(9))
                .num_accepted.float().mean().item() for l in (1.0, 0.8, 0.5, 0.2)]
    assert accepted == sorted(accepted) and accepted[-1] > accepted[0] + 0.5, accepted


# ---------------------------------------------------------------------------------------------
# Distribution: lossy SD follows f_l at drafted positions (and p at the bonus position)
# ---------------------------------------------------------------------------------------------


def run_lenient_rounds(p_pos: torch.Tensor, q_pos: torch.Tensor, lenience: float, rounds: int,
                       gen: torch.Generator) -> sampling.VerifyOutput:
    """test_sampling.run_rounds with a lenience: drafts from q_pos [γ, V], target p_pos [γ+1, V]."""
    gamma, vocab = q_pos.shape
    drafts = torch.multinomial(q_pos, rounds, replacement=True, generator=gen).T   # [rounds, γ]
    uniforms = torch.rand(rounds, gamma + 1, generator=gen, dtype=torch.float64)
    return sampling._verify_with_uniforms(
        drafts.contiguous(), torch.full((rounds,), gamma), q_pos.expand(rounds, gamma, vocab),
        p_pos.expand(rounds, gamma + 1, vocab), uniforms,
        torch.full((rounds,), lenience, dtype=torch.float64))


def lossy_targets(p: torch.Tensor, q: torch.Tensor, lenience: float) -> torch.Tensor:
    """Per position [γ+1, V]: f_l at the γ drafted positions (closed form), p at the bonus."""
    gamma = q.shape[0]
    drafted = torch.tensor([lossy_target(pr, qr, lenience) for pr, qr in
                            zip(p[:gamma].double().tolist(), q.double().tolist())])
    return torch.cat([drafted, p[gamma:].double()])


LENIENT_CASES = [(1, 0.3), (3, 0.6)]   # (γ, l)


@pytest.mark.parametrize("gamma, lenience", LENIENT_CASES)
def test_lossy_sd_follows_the_closed_form(gamma, lenience):
    gen = torch.Generator().manual_seed(500 + gamma)
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    target = lossy_targets(p, q, lenience)
    out = run_lenient_rounds(p, q, lenience, ROUNDS, gen)
    checks = position_checks(out, target)
    assert all(c["ok"] for c in checks), checks
    assert (out.num_accepted < gamma).any() and (out.num_accepted == gamma).any()
    assert not follows(out, p)        # lossy indeed: the same check tells f_l from p


def broken_lenient_residual(lenience):
    """norm(max(0, p − l·q)): rejection from 'SD against l·q' instead of the lenient residual."""
    def patch(monkeypatch):
        monkeypatch.setattr(sampling, "_residual",
                            lambda p, q: (p.double() - lenience * q.double()).clamp(min=0))
    return patch


def broken_lenience_inverted(lenience):
    """min(1, l·p/q): lenience applied the wrong way round (stricter than lossless)."""
    def patch(monkeypatch):
        correct = sampling._verify_with_uniforms

        def inverted(*args):
            *head, lenience_rows = args
            return correct(*head, 1.0 / lenience_rows)
        monkeypatch.setattr(sampling, "_verify_with_uniforms", inverted)
    return patch


@pytest.mark.parametrize("gamma, lenience", LENIENT_CASES)
@pytest.mark.parametrize("breakage", [broken_lenient_residual, broken_lenience_inverted])
def test_the_lossy_check_rejects_a_broken_lenient_sampler(gamma, lenience, breakage,
                                                          monkeypatch):
    gen = torch.Generator().manual_seed(500 + gamma)        # the same p, q and draws as above
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    breakage(lenience)(monkeypatch)
    out = run_lenient_rounds(p, q, lenience, ROUNDS, gen)
    checks = position_checks(out, lossy_targets(p, q, lenience))
    assert not all(c["ok"] for c in checks), checks


# ---------------------------------------------------------------------------------------------
# Distribution: truncation + lossless SD follows the truncated, renormalized p
# ---------------------------------------------------------------------------------------------

TRUNCATIONS = {"min_p": dict(min_p=0.1), "eta": dict(eta=0.09)}


def run_truncated_rounds(p: torch.Tensor, q: torch.Tensor, options: dict, gen: torch.Generator,
                         breakage: str | None = None) -> sampling.VerifyOutput:
    """Drafts from the untruncated q [γ, V]; the verifier truncates p [γ+1, V] as the worker does
    (process_logits, then truncate_target), or as a broken variant would:
    "after_acceptance" tests the drafts against the untruncated p and truncates only the
    distribution the recovered / bonus token comes from; "q_too" truncates q in the verifier as well
    (the drafter still sampled from the untruncated q)."""
    gamma, vocab = q.shape
    params = [SamplingParams(temperature=1.0, **options)]
    p_tilde = truncate_target(p[None], params)[0]                               # [γ+1, V]
    q_verify = truncate_target(q[None], params)[0] if breakage == "q_too" else q
    p_verify = p_tilde
    if breakage == "after_acceptance":
        p_verify = torch.cat([p[:gamma], p_tilde[gamma:]])
    drafts = torch.multinomial(q, ROUNDS, replacement=True, generator=gen).T    # [rounds, γ]
    uniforms = torch.rand(ROUNDS, gamma + 1, generator=gen, dtype=torch.float64)
    return sampling._verify_with_uniforms(
        drafts.contiguous(), torch.full((ROUNDS,), gamma), q_verify.expand(ROUNDS, gamma, vocab),
        p_verify.expand(ROUNDS, gamma + 1, vocab), uniforms)


def truncated_targets(p: torch.Tensor, options: dict) -> torch.Tensor:
    return expected_table(p, lambda row: reference_truncate(row, options.get("min_p", 0.0),
                                                            options.get("eta", 0.0)))


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("kind", TRUNCATIONS)
def test_truncation_plus_sd_follows_the_truncated_target(gamma, kind):
    gen = torch.Generator().manual_seed(600 + gamma)
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    target = truncated_targets(p, TRUNCATIONS[kind])
    assert ((target == 0) & (p > 0)).any(-1).all()      # it removes tokens at every position
    out = run_truncated_rounds(p, q, TRUNCATIONS[kind], gen)
    checks = position_checks(out, target)
    assert all(c["ok"] for c in checks), checks
    assert (out.num_accepted < gamma).any() and (out.num_accepted == gamma).any()
    assert not follows(out, p)


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("kind", TRUNCATIONS)
@pytest.mark.parametrize("breakage", ["after_acceptance", "q_too"])
def test_the_truncation_check_rejects_a_broken_pipeline(gamma, kind, breakage, monkeypatch):
    gen = torch.Generator().manual_seed(600 + gamma)        # the same p, q and draws as above
    p, q = random_p_q(gamma, VOCAB_STAT, gen)
    if breakage == "after_acceptance":   # the recovered token from the truncated residual too
        correct = sampling._residual
        params = [SamplingParams(temperature=1.0, **TRUNCATIONS[kind])]
        monkeypatch.setattr(sampling, "_residual", lambda p_e, q_e: correct(
            truncate_target(p_e.float()[:, None], params * len(p_e))[:, 0], q_e))
    out = run_truncated_rounds(p, q, TRUNCATIONS[kind], gen, breakage)
    checks = position_checks(out, truncated_targets(p, TRUNCATIONS[kind]))
    assert not all(c["ok"] for c in checks), checks


def test_target_only_sampling_uses_the_same_truncated_p():
    """TARGET rounds are γ = 0 rows of the same verifier: plain sampling from p̃."""
    gen = torch.Generator().manual_seed(7)
    p, _ = random_p_q(0, VOCAB_STAT, gen)
    options = TRUNCATIONS["min_p"]
    p_tilde = truncate_target(p[None], [SamplingParams(temperature=1.0, **options)])[0]
    n = ROUNDS // 2
    uniforms = torch.rand(n, 1, generator=gen, dtype=torch.float64)
    out = sampling._verify_with_uniforms(torch.zeros(n, 0, dtype=torch.long),
                                         torch.zeros(n, dtype=torch.long),
                                         torch.zeros(n, 0, VOCAB_STAT),
                                         p_tilde.expand(n, 1, VOCAB_STAT), uniforms)
    assert follows(out, truncated_targets(p, options))


# ---------------------------------------------------------------------------------------------
# Through the real workers, in process (tiny random pair, float64)
# ---------------------------------------------------------------------------------------------

PROMPTS = [f"def h{i}(z):\n    return" if i % 2 else f"z = {i} -" for i in range(6)]


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine.from_paths(*tiny_pair, dtype="float64")


def run(engine, mode, **fields):
    return engine.generate([engine.request(p, request_id=f"{mode.name}-{i}", mode=mode,
                                           max_new_tokens=12, **fields)
                            for i, p in enumerate(PROMPTS)])


def below_min_p(engine, results, min_p: float) -> int:
    """Generated tokens whose target probability (temperature 1) is below min_p · max p."""
    model = engine.verifier.worker.runner.model
    count = 0
    for prompt, result in zip(PROMPTS, results):
        if not result.token_ids:
            continue
        ids = engine.encode(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([ids + result.token_ids])).logits[0]
        probs = logits[len(ids) - 1:-1].softmax(-1)                 # [generated, vocab]
        chosen = probs.gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
        count += int((chosen < min_p * probs.amax(-1) * (1 - 1e-5)).sum())  # fp32 in the worker
    return count


def test_workers_sample_target_and_speculative_from_the_truncated_target(engine):
    min_p = 0.5
    for mode, extra in ((Mode.TARGET, {}), (Mode.SPECULATIVE, dict(num_draft_tokens=3))):
        truncated = run(engine, mode, sampling=SamplingParams(1.0, seed=11, min_p=min_p), **extra)
        assert sum(len(r.token_ids) for r in truncated) > 3 * len(PROMPTS)
        assert below_min_p(engine, truncated, min_p) == 0, mode
    plain = run(engine, Mode.TARGET, sampling=SamplingParams(1.0, seed=11))
    assert below_min_p(engine, plain, min_p) > 0       # the check has teeth on this pair


def test_workers_apply_lenience_only_when_sampling(engine):
    def accepted(lenience, temperature):
        results = run(engine, Mode.SPECULATIVE, num_draft_tokens=4,
                      sampling=SamplingParams(temperature, seed=5, lenience=lenience))
        return sum(r.stats.accepted for r in results), [r.token_ids for r in results]

    lossless, _ = accepted(1.0, 1.0)
    lenient, _ = accepted(0.1, 1.0)
    assert lenient > lossless
    assert accepted(0.1, 0.0) == accepted(1.0, 0.0)    # greedy: no effect
