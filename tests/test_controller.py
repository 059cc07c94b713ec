"""The speculation controller (engine.controller) and the replica cost meter (engine.costs):
the equations against brute force, the choices they imply, and the loop with the controller on."""
from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from speccascade.engine.controller import (PROBE_EVERY, Acceptance, SpeculationController,
                                           expected_tokens, round_ms)
from speccascade.engine.costs import CostMeter, CostReport
from speccascade.engine.engine import Engine
from speccascade.engine.loop import GenerationRequest, Mode, generate_all
from speccascade.sampling import SamplingParams

# A GPU-like verifier (a forward costs about the same for 1 or 9 tokens) and a cheap drafter.
VERIFY = CostReport(coef=(20.0, 0.5, 0.2), rows=1.0, busy=0.2, active=1)
DRAFT = CostReport(coef=(0.5, 2.0, 0.0), rows=1.0, busy=0.2, active=1)


@given(st.lists(st.floats(0, 1), min_size=8, max_size=8), st.integers(0, 8))
def test_expected_tokens_is_the_mean_over_acceptance_outcomes(a, gamma):
    """E(γ) = 1 + Σ_i Π_{j≤i} a_j equals the mean committed tokens over every accept/reject path."""
    mean = 0.0
    for outcome in itertools.product((True, False), repeat=gamma):
        prob, accepted = 1.0, 0
        for i, ok in enumerate(outcome):
            prob *= a[i] if ok else 1 - a[i]
        accepted = next((i for i, ok in enumerate(outcome) if not ok), gamma)
        mean += prob * (accepted + 1)
    assert expected_tokens(a, gamma) == pytest.approx(mean, abs=1e-9)


def test_acceptance_counts_only_the_positions_a_round_tested():
    acc = Acceptance(4, forget=1.0, strength=0.0)
    acc.observe(drafted=4, accepted=1)   # position 1 accepted, 2 rejected, 3 and 4 untested
    acc.observe(drafted=2, accepted=2)   # both accepted
    assert acc.verified == [2, 2, 0, 0] and acc.accepted == [2, 1, 0, 0]
    assert acc.rates([0.3] * 4)[:2] == [1.0, 0.5]


def choose(a: float, *, verify=VERIFY, draft=DRAFT, f=0.0, gamma_max=8, o=0.0):
    rates = [a] * gamma_max
    options = [(g, ahead) for g in range(gamma_max + 1) for ahead in ((False, True) if g else (False,))]
    return max(options, key=lambda ga: expected_tokens(rates, ga[0]) / round_ms(
        ga[0], ga[1], rates, draft, verify, o, o, f))


def test_idle_replicas_and_a_good_draft_speculate_deeply_and_ahead():
    gamma, ahead = choose(0.9)
    assert gamma >= 5 and ahead


def test_a_useless_draft_means_plain_target_steps():
    assert choose(0.02) == (0, False)


def test_load_makes_it_draft_less():
    """Batched verification: B streams share each forward, whose cost grows with the B·(γ+1)
    tokens it computes, so a drafted token costs more the more streams there are."""
    def chosen(a, streams):
        return choose(a, verify=CostReport(VERIFY.coef, float(streams), 1.0, streams),
                      draft=CostReport(DRAFT.coef, float(streams), 1.0, streams), f=0.1)[0]

    for a in (0.5, 0.7, 0.9):
        gammas = [chosen(a, streams) for streams in (1, 4, 16, 64, 256)]
        assert gammas == sorted(gammas, reverse=True) and gammas[-1] < gammas[0]


def test_serialized_load_overlaps_drafting_with_other_streams_verification():
    """A replica that serves its streams one forward at a time (rows 1): the drafter works for
    some streams while the verifier works for others, so load does not make drafting dearer."""
    cpu_verify, cpu_draft = (10.0, 0.5, 1.0), (0.2, 1.0, 0.0)
    idle = choose(0.7, verify=CostReport(cpu_verify, 1.0, 0.5, 1),
                  draft=CostReport(cpu_draft, 1.0, 0.5, 1), f=0.5)[0]
    loaded = choose(0.7, verify=CostReport(cpu_verify, 1.0, 1.0, 16),
                    draft=CostReport(cpu_draft, 1.0, 1.0, 16), f=0.5)[0]
    assert loaded >= idle > 0


def test_the_cost_meter_recovers_a_linear_cost_and_the_load():
    meter = CostMeter(forget=0.99)
    t = 0.0
    for i in range(200):
        rows, tokens = 1 + i % 4, (1 + i % 4) * (1 + i % 7)
        ms = 3.0 + 0.5 * rows + 0.25 * tokens
        meter.observe((1.0, rows, tokens), ms, rows, [f"s{i % 3}"], t, t + ms / 1000)
        t += 2 * ms / 1000   # busy half of the time
    report = meter.report()
    assert report.coef == pytest.approx((3.0, 0.5, 0.25), abs=0.01)  # the ridge biases a little
    assert report.busy == pytest.approx(0.5, abs=0.05)
    assert report.active == 3
    assert report.predict(2, 10) == pytest.approx(6.5, abs=1e-2)


def test_a_meter_whose_forwards_never_vary_predicts_their_time():
    meter = CostMeter()
    for i in range(20):
        meter.observe((1.0, 1, 5), 12.0, 1, ["a"], i, i + 0.012)
    assert meter.report().predict(1, 5) == pytest.approx(12.0, rel=1e-2)


def test_traffic_prior_is_shared_by_requests_of_the_same_kind():
    controller = SpeculationController(gamma_max=4)
    greedy = GenerationRequest("a", [1], 8)
    sampled = GenerationRequest("b", [1], 8, sampling=SamplingParams(temperature=0.8))
    first = controller.start(greedy)
    for _ in range(50):
        first.observe_round(4, 4)
    assert controller.start(greedy).rates()[0] > 0.9       # a new greedy request starts from it
    assert controller.start(sampled).rates()[0] == pytest.approx(0.6)  # another kind does not


# -- the loop with the controller on (tiny random pair, float64) -------------------------------

PROMPTS = [f"def g{i}(y):\n    return" if i % 2 else f"y = {i} +" for i in range(8)]


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine.from_paths(*tiny_pair, dtype="float64")


def _run(engine, prompts, **fields):
    return engine.generate([engine.request(p, request_id=f"r{i}", max_new_tokens=48, **fields)
                            for i, p in enumerate(prompts)])


@pytest.mark.parametrize("streams", [1, 8])
def test_controller_keeps_greedy_output_equal_to_target(engine, streams):
    target = [r for p in PROMPTS[:streams] for r in _run(engine, [p], mode=Mode.TARGET)]
    controlled = _run(engine, PROMPTS[:streams], mode=Mode.SPECULATIVE)
    for t, c in zip(target, controlled):
        assert c.token_ids == t.token_ids
        assert sum(c.stats.gamma_histogram) == c.stats.rounds
    # the random tiny pair accepts little: the controller ends up drafting little or nothing
    assert sum(c.stats.mean_gamma for c in controlled) / streams < 4


class _Reporting:
    """A real in-process drafter or verifier whose results carry a given cost report, so that
    the decision does not depend on this machine's timings."""

    def __init__(self, inner, report: CostReport):
        self.inner, self.report = inner, report

    async def draft(self, request):
        return self._stamped(await self.inner.draft(request))

    async def verify(self, request):
        return self._stamped(await self.inner.verify(request))

    def _stamped(self, result):
        result.cost = self.report
        return result

    async def release(self, seq_id):
        await self.inner.release(seq_id)


def _controlled(engine, prompt, verify: CostReport, draft: CostReport):
    request = engine.request(prompt, request_id="c", max_new_tokens=48, mode=Mode.SPECULATIVE)
    return asyncio.run(generate_all(request, _Reporting(engine.drafter, draft),
                                    _Reporting(engine.verifier, verify), engine.tokenizer))


def test_identical_twins_with_a_cheap_draft_draft_deep_and_an_equal_cost_draft_not(tiny_twins):
    twins = Engine.from_paths(*tiny_twins, dtype="float64")
    [target] = _run(twins, PROMPTS[:1], mode=Mode.TARGET)
    cheap = _controlled(twins, PROMPTS[0], VERIFY, DRAFT)
    assert cheap.token_ids == target.token_ids
    assert cheap.stats.accepted == cheap.stats.drafted > 0
    assert cheap.stats.mean_gamma > 5     # every draft accepted, drafts nearly free: deep blocks
    # A draft that costs what a verification does (the twins really are the same model) never
    # pays: E(γ) = γ + 1 tokens for at least the time of γ + 1 target steps, plus a call.
    dear = _controlled(twins, PROMPTS[0], VERIFY, CostReport((0.0, 20.7, 0.0), 1.0, 0.2, 1))
    assert dear.token_ids == target.token_ids
    # drafting rounds: the first (no report yet) and one probe per PROBE_EVERY target steps
    drafting = dear.stats.rounds - dear.stats.gamma_histogram[0]
    assert 0 < drafting <= 1 + dear.stats.rounds // PROBE_EVERY


def test_explicit_gamma_is_honoured_exactly(engine):
    for r in _run(engine, PROMPTS[:3], mode=Mode.SPECULATIVE, num_draft_tokens=3):
        hist = r.stats.gamma_histogram
        # every round drafts 3, except rounds cut short at the end of max_new_tokens
        assert hist[3] >= r.stats.rounds - 3 and sum(hist) == r.stats.rounds


def test_a_released_sequence_no_longer_counts_as_load():
    meter = CostMeter()
    for i, seq in enumerate(["a", "b"]):
        meter.observe((1.0, 1, 5), 10.0, 1, [seq], i * 0.01, i * 0.01 + 0.01)
    assert meter.report().active == 2
    meter.released("a")
    assert meter.report().active == 1
