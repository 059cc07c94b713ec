"""The speculation controller: γ, and whether to draft ahead, for each request and round.

Terms (REFERENCE.md §1, §11), all estimated online:
  a_i       P(draft i accepted | drafts 1..i−1 accepted): the request's own counts, with a prior
            from the recent traffic of the same kind (mode, sampling options, cascade rule, α)
  E(γ)      tokens a round commits in expectation: 1 + Σ_{i≤γ} Π_{j≤i} a_j
  D(γ)      a draft call of γ steps on the drafter, from its reported fit (engine.costs)
  V(n)      a verify forward of n tokens per row on the verifier, from its reported fit
  B, L      a replica's mean rows per forward, and the sequences that call it (its load)
  o_d, o_v  per-call transport cost: the call's wall time here − the time the replica spent on it
  f         share of the drafter's compute that delays the verifier (draft_ahead_waste_cost)

Latency of a round (γ = 0 is a plain target step: ℓ = o_v + V(1)):
  sequential   ℓ = o_d + D(γ) + o_v + V(γ+1)
  draft ahead  ℓ = o_v + V(γ+1) + (1−P)(o_d + D(γ)) + P·max(0, o_d + D(γ+1) − o_v − V(γ+1))
                   + f·D(γ+1),        P = Π_{j≤γ+1} a_j (block k accepted and the bonus guessed)
Load: L streams share a replica in a closed loop, so no round is shorter than the time the
bottleneck replica needs for one round of each of them. Per round and stream the replicas work
  w_v = V(γ+1) / B_v,   w_d = (D(γ) [+ (1−P)·D(γ+1) wasted when drafting ahead]) / B_d
  T = max(ℓ, L_v·w_v + f·L_d·w_d, L_d·w_d + f·L_v·w_v)
The choice is argmax over γ ∈ {0 … γmax} and ahead ∈ {no, yes} of E(γ) / T. Idle replicas make it
the latency optimum; busy ones make it the work optimum, which drafts less (to γ = 0 when the
draft is not worth its compute). The choice never changes the output distribution: any γ is
verified losslessly (or against the same π for cascades).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from speccascade.engine.costs import CostReport

DEFAULT_GAMMA_MAX = 8
# After this many plain target steps in a row, one round drafts (the best γ ≥ 1): the draft's
# cost and acceptance are only measured by drafting, and a stale estimate would never heal.
PROBE_EVERY = 32
MAX_TRAFFIC_KINDS = 256   # priors kept, one per kind of request


class Acceptance:
    """Counts of drafts verified and accepted at each position 1..γmax, exponentially forgotten.
    rates(prior) returns a_i = (accepted_i + m·prior_i) / (verified_i + m)."""

    def __init__(self, gamma_max: int, forget: float, strength: float):
        self.verified = [0.0] * gamma_max
        self.accepted = [0.0] * gamma_max
        self.forget, self.strength = forget, strength

    def observe(self, drafted: int, accepted: int) -> None:
        # Positions 1..accepted were accepted; position accepted+1 (if drafted) was rejected;
        # later positions were not tested (a_i is conditional on the ones before).
        for i in range(len(self.verified)):
            self.verified[i] *= self.forget
            self.accepted[i] *= self.forget
        for i in range(min(accepted + 1, drafted, len(self.verified))):
            self.verified[i] += 1
            self.accepted[i] += i < accepted

    def rates(self, prior: list[float]) -> list[float]:
        m = self.strength
        return [(a + m * p) / (v + m) if v + m > 0 else p
                for a, v, p in zip(self.accepted, self.verified, prior)]


@dataclass(frozen=True)
class Decision:
    gamma: int
    ahead: bool
    expected_tokens: float
    round_ms: float


@dataclass
class _Overhead:
    """Exponential average of a call's transport cost (ms); None until measured."""
    value: float | None = None

    def observe(self, ms: float, weight: float = 0.2) -> None:
        ms = max(0.0, ms)
        self.value = ms if self.value is None else self.value + weight * (ms - self.value)

    def get(self) -> float:
        return self.value or 0.0


def expected_tokens(a: list[float], gamma: int) -> float:
    """E(γ) = 1 + Σ_{i≤γ} Π_{j≤i} a_j."""
    total, run = 1.0, 1.0
    for i in range(gamma):
        run *= a[i]
        total += run
    return total


def round_ms(gamma: int, ahead: bool, a: list[float], draft: CostReport | None,
             verify: CostReport | None, o_d: float, o_v: float, f: float) -> float:
    """T(γ, ahead) of the module docstring, in ms."""
    def V(n: int) -> float:
        if verify is None:
            return 1.0  # nothing measured yet: tokens only
        return verify.predict(verify.rows, verify.rows * n)

    def D(steps: int) -> float:
        if draft is None or steps == 0:
            return 0.0 if steps == 0 else 0.1 * steps
        return draft.predict(steps, draft.rows * steps)

    b_v = max(1.0, verify.rows) if verify else 1.0
    b_d = max(1.0, draft.rows) if draft else 1.0
    l_v = max(1, verify.active) if verify else 1
    l_d = max(1, draft.active) if draft else 1
    v = V(gamma + 1)
    if gamma == 0:
        return max(o_v + v, l_v * v / b_v)
    d = D(gamma)
    if ahead:
        p = 1.0
        for i in range(min(gamma + 1, len(a))):
            p *= a[i]
        d_ahead = D(gamma + 1)
        latency = (o_v + v + (1 - p) * (o_d + d) + p * max(0.0, o_d + d_ahead - o_v - v)
                   + f * d_ahead)
        d_work = d * (1 - p) + d_ahead  # a used block costs D(γ+1); a discarded one and the redraft
    else:
        latency = o_d + d + o_v + v
        d_work = d
    w_v, w_d = v / b_v, d_work / b_d
    return max(latency, l_v * w_v + f * l_d * w_d, l_d * w_d + f * l_v * w_v)


class RequestControl:
    """One request's controller: its acceptance counts and its replicas' latest reports."""

    def __init__(self, parent: "SpeculationController", key: tuple, gamma_max: int,
                 waste_cost: float):
        self.parent, self.key, self.gamma_max = parent, key, gamma_max
        self.waste_cost = waste_cost
        self.own = Acceptance(gamma_max, forget=0.95, strength=4.0)
        # Until its own calls report, a request starts from the latest reports of any request.
        self.draft_report: CostReport | None = parent.last_draft_report
        self.verify_report: CostReport | None = parent.last_verify_report
        self._first_call = {"draft": True, "verify": True}
        self._target_steps = 0   # plain target steps in a row

    def rates(self) -> list[float]:
        return self.own.rates(self.parent.prior(self.key, self.gamma_max))

    def choose(self, cap: int, pipelined: bool | None) -> Decision:
        """The best (γ, ahead) with γ ≤ cap; `pipelined` True/False fixes ahead."""
        a = self.rates()
        probe = self._target_steps >= PROBE_EVERY
        best = None
        aheads = (False, True) if pipelined is None else (bool(pipelined),)
        for gamma in range(int(probe and cap > 0), min(cap, self.gamma_max) + 1):
            e = expected_tokens(a, gamma)
            for ahead in aheads if gamma else (False,):
                t = round_ms(gamma, ahead, a, self.draft_report, self.verify_report,
                             self.parent.o_d.get(), self.parent.o_v.get(), self.waste_cost)
                if best is None or e / t > best.expected_tokens / best.round_ms:
                    best = Decision(gamma, ahead, e, t)
        self._target_steps = self._target_steps + 1 if best.gamma == 0 else 0
        return best

    def observe_round(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.own.observe(drafted, accepted)
            self.parent.observe(self.key, self.gamma_max, drafted, accepted)

    def observe_draft(self, report: CostReport | None, wall_ms: float | None = None,
                      served_ms: float = 0.0) -> None:
        """A draft call's report; wall_ms only for calls the loop waited for (not drafted ahead)."""
        self.draft_report = report or self.draft_report
        self.parent.last_draft_report = self.draft_report
        first = self._first("draft")
        if wall_ms is not None and not first:
            self.parent.o_d.observe(wall_ms - served_ms)

    def observe_verify(self, report: CostReport | None, wall_ms: float, served_ms: float) -> None:
        self.verify_report = report or self.verify_report
        self.parent.last_verify_report = self.verify_report
        if not self._first("verify"):
            self.parent.o_v.observe(wall_ms - served_ms)

    def _first(self, side: str) -> bool:
        """A request's first call to a side also pays for setting up its handle (measured: tens
        of ms through Serve): a per-request cost, not a per-round one, so not in o_d / o_v."""
        first, self._first_call[side] = self._first_call[side], False
        return first


@dataclass
class SpeculationController:
    """One per router (or in-process engine): the traffic priors its requests share."""
    gamma_max: int = DEFAULT_GAMMA_MAX
    default_rate: float = 0.6   # a_i before any traffic of a kind was seen
    last_draft_report: CostReport | None = None
    last_verify_report: CostReport | None = None
    # Transport costs are the deployment's, not a request's: measured around every call.
    o_d: _Overhead = field(default_factory=_Overhead)
    o_v: _Overhead = field(default_factory=_Overhead)
    _traffic: dict[tuple, Acceptance] = field(default_factory=dict)

    def start(self, request) -> RequestControl:
        s, c = request.sampling, request.cascade
        key = (int(request.mode), s.greedy, round(s.temperature, 2), round(s.top_p, 2), s.top_k,
               round(s.min_p, 3), round(s.eta, 4), round(s.lenience, 3),
               None if c is None else (int(c.rule), round(c.alpha, 4)))
        gamma_max = max(1, min(self.gamma_max, request.max_num_draft_tokens))
        return RequestControl(self, key, gamma_max, request.draft_ahead_waste_cost)

    def prior(self, key: tuple, gamma_max: int) -> list[float]:
        """a_i of recent traffic of this kind. A position the traffic rarely reaches backs off to
        the rate of the position before it: deep positions are tested only after every earlier
        draft was accepted, where the draft tends to stay right (measured on the default pair:
        a_4… ≈ 0.95 where a_1 ≈ 0.9), so the pooled rate would understate them and γ would never
        grow far enough to learn better."""
        traffic = self._traffic.get(key)
        if traffic is None:
            return [self.default_rate] * gamma_max
        out, previous, m = [], self.default_rate, traffic.strength
        for i in range(gamma_max):
            if i < len(traffic.verified):
                previous = (traffic.accepted[i] + m * previous) / (traffic.verified[i] + m)
            out.append(previous)
        return out

    def observe(self, key: tuple, gamma_max: int, drafted: int, accepted: int) -> None:
        traffic = self._traffic.get(key)
        if traffic is None or len(traffic.verified) < gamma_max:
            traffic = self._traffic[key] = _grown(traffic, gamma_max)
            while len(self._traffic) > MAX_TRAFFIC_KINDS:  # the oldest kind goes first
                self._traffic.pop(next(iter(self._traffic)))
        traffic.observe(drafted, accepted)


def _grown(old: Acceptance | None, gamma_max: int) -> Acceptance:
    new = Acceptance(gamma_max, forget=0.995, strength=2.0)
    if old is not None:
        new.verified[:len(old.verified)] = old.verified
        new.accepted[:len(old.accepted)] = old.accepted
    return new
