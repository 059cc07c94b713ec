"""Sampling math for speculative decoding and speculative cascades — pure torch.

Terms (REFERENCE.md §1–3; the same names are used in code, docs and metrics):

- ``p`` — the **target** (large, verifier) model's next-token distribution;
  ``q`` — the **draft** (small) model's.
- ``γ`` (``num_draft_tokens``) — tokens drafted per round. A round drafts γ tokens from q and checks
  them with one target forward over γ + 1 positions.
- **accepted** — a drafted token ``x`` kept by the test ``u < min(1, p(x) / q(x))``, u ~ U[0, 1).
- **recovered** — the token emitted at the first rejection, sampled from the residual
  ``norm(max(0, p − q))`` at that position; the round stops there.
- **bonus** — the token sampled from ``p`` at position γ when all γ drafts were accepted.
  Every round emits ``accepted + 1`` tokens.
- ``π`` — a speculative cascade's target distribution, built from q and p by a deferral rule.
  The cascade runs the *same* lossless sampler with π in place of p, so its output follows π
  exactly as speculative decoding's follows p.
- ``α`` (``deferral_threshold``) — the per-request knob of a deferral rule; one end of its
  range gives π = p (pure speculative decoding, ``SD_END``), the other π = q (``DRAFT_END``).
- ``l`` (``lenience``) — lossy speculative decoding (Leviathan et al. 2023, App. A.5), a baseline
  for cascades: accept x with probability min(1, p(x) / (l·q(x))), l ∈ (0, 1]; l = 1 is lossless.
- **truncated target** ``p̃`` — truncation sampling of the target (min-p, η-sampling): p with the
  unlikely tokens removed and renormalized (``truncate_target``). Verified losslessly, it is the
  Fast-HSD baseline: the output follows p̃ exactly (REFERENCE.md §15).

Guarantees:

- **Lossless.** ``verify`` emits, at every position, a token distributed exactly as the given
  target (p, p̃ when truncated, or π for cascades) conditioned on the tokens emitted before it.
- **Lenient (l < 1), exactly.** The token emitted at a *drafted* position follows

      f_l(v) = min(q(v), p(v)/l) + (1 − β_l) · r(v),   β_l = Σ_u min(q(u), p(u)/l),
      r = norm(max(0, p − q))

  (derivation at ``verify``); the bonus token still follows p. f_1 = p, and f_l → q as l → 0.
- **Seeded.** Randomness comes only from per-row generators (``round_generator``) seeded from
  (request seed, absolute token position, stream), and every row consumes a number of uniforms
  that depends only on its own γ. A request's output therefore does not depend on what else shares
  the batch or on which replica serves it.

Temperature 0 is greedy: ``process_logits`` returns one-hot rows, and ``verify`` on one-hot p, q
gives the same result as ``verify_greedy``. Truncation and lenience change nothing there: a one-hot
p keeps its token under any truncation, and the lenient test accepts exactly the argmax of p.

Cascade detail (following the reference notebook ``google-research/speculative_cascades``): the
deferral *decision* compares temperature-1 probabilities (``p_raw``, ``q_raw``), while π mixes the
processed (temperature / top-k / top-p) ``p`` and ``q`` that are actually sampled. OPT's
total-variation term is taken, as in the notebook, between the processed distributions.
The notebook drafts one token per round, so it has no bonus position; here the bonus token comes
from whatever the caller passes at position γ — p when the draft distribution at that position is
unknown (our drafters return q for the γ drafted positions only), or π built with it when it is.
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Parameters and validation
# --------------------------------------------------------------------------------------------


class ParamError(ValueError):
    """A request parameter is out of range. ``field`` is the request field name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def __reduce__(self):  # picklable: it crosses Ray process boundaries
        return (type(self), (self.field, self.message))


class DeferralRule(enum.IntEnum):
    """Speculative-cascade deferral rules; values match the proto enum (0 = unspecified)."""

    CHOW = 1       # keep q when max q ≥ 1 − α
    DIFF = 2       # keep q when max q ≥ max p − α
    OPT = 3        # keep q when max q ≥ max p − α·TV(q, p)
    TOKEN_V1 = 4   # A = {v : q(v) ≥ max p − α}
    TOKEN_V2 = 5   # A = {v : p(v) ≥ max p − α}
    TOKEN_V3 = 6   # A = {v : p(v) ≥ (1 − α)·max p}


WHOLE_DISTRIBUTION_RULES = frozenset({DeferralRule.CHOW, DeferralRule.DIFF, DeferralRule.OPT})

# Closed interval of α per rule. OPT accepts any finite α.
ALPHA_RANGE: dict[DeferralRule, tuple[float, float]] = {
    DeferralRule.CHOW: (0.0, 1.0),
    DeferralRule.DIFF: (-1.0, 1.0),
    DeferralRule.OPT: (-math.inf, math.inf),
    DeferralRule.TOKEN_V1: (-1.0, 1.0),
    DeferralRule.TOKEN_V2: (-1.0, 1.0),
    DeferralRule.TOKEN_V3: (0.0, 1.0),
}

# α at which π = p (pure speculative decoding). Exceptions: CHOW at 0 keeps q where max q is exactly
# 1; OPT reaches p only as α → −∞ (−1e9 is p unless TV(q, p) < ~1e-9, where q ≈ p anyway);
# TOKEN_V3 has no SD end — at 0 it keeps the argmax of p, so π = q(a)·δ_a + (1 − q(a))·p with
# a = argmax p, which equals p only at temperature 0 (one-hot p and q).
SD_END: dict[DeferralRule, float] = {
    DeferralRule.CHOW: 0.0,
    DeferralRule.DIFF: -1.0,
    DeferralRule.OPT: -1e9,
    DeferralRule.TOKEN_V1: -1.0,
    DeferralRule.TOKEN_V2: -1.0,
    DeferralRule.TOKEN_V3: 0.0,
}

# α at which π = q: every draft is accepted.
DRAFT_END: dict[DeferralRule, float] = {
    DeferralRule.CHOW: 1.0,
    DeferralRule.DIFF: 1.0,
    DeferralRule.OPT: 1e9,
    DeferralRule.TOKEN_V1: 1.0,
    DeferralRule.TOKEN_V2: 1.0,
    DeferralRule.TOKEN_V3: 1.0,
}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters.

    temperature, top_k and top_p apply identically to p and q (``process_logits``); min_p and eta
    truncate the target p only (``truncate_target``; q stays as drafted, which keeps SD exact for
    p̃); lenience changes only the acceptance test (``verify``). Which modes may set the last three
    is checked where a request is built (engine.loop.GenerationRequest).
    """

    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # (0, 1]; 1 = off
    seed: int = 0
    min_p: float = 0.0         # [0, 1); keep p(v) ≥ min_p · max p; 0 = off
    eta: float = 0.0           # [0, 1); η-sampling, keep p(v) ≥ min(η, √η·e^(−H(p))); 0 = off
    lenience: float = 1.0      # (0, 1]; accept with min(1, p/(l·q)); 1 = lossless

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ParamError("temperature",
                             f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ParamError("top_k", f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        tp = self.top_p
        if isinstance(tp, bool) or not isinstance(tp, (int, float)) or not 0 < tp <= 1:
            raise ParamError("top_p", f"top_p must be in (0, 1] (1 = off), got {tp!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ParamError("seed", f"seed must be an integer, got {self.seed!r}")
        for name, note in (("min_p", "keep tokens with p >= min_p * max p"),
                           ("eta", "eta-sampling, Hewitt et al. 2022")):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v < 1:
                raise ParamError(name, f"{name} must be in [0, 1) (0 = off; {note}), got {v!r}")
        le = self.lenience
        if not _is_number(le) or not 0 < le <= 1:
            raise ParamError("lenience", f"lenience must be in (0, 1] (1 = lossless speculative "
                             f"decoding; smaller accepts more drafts), got {le!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncates(self) -> bool:
        """Whether the target is truncated (min-p or η) before sampling or verification."""
        return self.min_p > 0 or self.eta > 0


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _range_text(lo: float, hi: float) -> str:
    if math.isinf(lo) and math.isinf(hi):
        return "any finite number"
    return f"[{lo:g}, {hi:g}]"


@dataclass(frozen=True)
class CascadeParams:
    """Per-request speculative-cascade parameters: the deferral rule and its threshold α."""

    rule: DeferralRule
    alpha: float

    def __post_init__(self):
        try:
            rule = DeferralRule(self.rule)
        except ValueError:
            names = ", ".join(r.name for r in DeferralRule)
            raise ParamError("deferral_rule",
                             f"deferral_rule must be one of {names}, got {self.rule!r}") from None
        object.__setattr__(self, "rule", rule)
        lo, hi = ALPHA_RANGE[rule]
        a = self.alpha
        if (isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
                or not lo <= a <= hi):
            raise ParamError("deferral_threshold",
                             f"deferral_threshold (alpha) must be finite; allowed range for "
                             f"{rule.name} is {_range_text(lo, hi)}, got {a!r}")


def validate_num_draft_tokens(num_draft_tokens: int, maximum: int) -> None:
    """γ must be in [1, maximum]."""
    n = num_draft_tokens
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= maximum:
        raise ParamError("num_draft_tokens",
                         f"num_draft_tokens must be an integer in [1, {maximum}], got {n!r}")


# --------------------------------------------------------------------------------------------
# Logits → probabilities
# --------------------------------------------------------------------------------------------


def process_logits(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """logits [batch, k, vocab] -> probs [batch, k, vocab] float32.

    Per row, in order: temperature, then top-k (keeps every token whose logit is ≥ the k-th
    largest, so ties at the boundary are kept, as in Hugging Face and vLLM), then top-p (keeps the
    smallest set of most likely tokens whose mass reaches top_p, at least one token), then
    renormalize. Temperature 0 gives a one-hot row at the argmax (ties: lowest index, like
    torch.argmax). The same function and parameters must be used for p and q.
    """
    if logits.dim() != 3 or logits.shape[0] != len(params):
        raise ValueError(f"logits must be [batch, k, vocab] with batch = len(params); "
                         f"got {tuple(logits.shape)} and {len(params)} params")
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = torch.tensor([s.greedy for s in params])                                  # [batch]
    temperature = torch.tensor([s.temperature if not s.greedy else 1.0 for s in params])
    top_k = torch.tensor([min(s.top_k, vocab) for s in params])                 # [batch], 0 = off
    top_p = torch.tensor([float(s.top_p) for s in params], dtype=torch.float64)  # [batch], 1 = off

    # Temperature; subtracting the max first keeps tiny temperatures finite.
    scaled = logits - logits.amax(-1, keepdim=True)
    scaled = scaled / temperature[:, None, None]                                 # [batch, k, vocab]
    if bool((top_k > 0).any()):
        scaled = _apply_top_k(scaled, top_k)
    if bool((top_p < 1).any()):
        scaled = _apply_top_p(scaled, top_p)
    probs = torch.softmax(scaled, dim=-1)                                        # [batch, k, vocab]

    if bool(greedy.any()):
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()  # [batch, k, vocab]
        probs = torch.where(greedy[:, None, None], one_hot, probs)
    return probs


def _apply_top_k(scaled: Tensor, top_k: Tensor) -> Tensor:
    """Mask (-inf) logits below each row's k-th largest. scaled [batch, k, vocab]; top_k [batch]."""
    largest = scaled.topk(int(top_k.max()), dim=-1).values                       # [batch, k, kmax]
    index = (top_k.clamp(min=1) - 1)[:, None, None].expand(*scaled.shape[:2], 1)
    kth = largest.gather(-1, index)                                              # [batch, k, 1]
    kth = torch.where((top_k > 0)[:, None, None], kth, -math.inf)                # off: keep all
    return scaled.masked_fill(scaled < kth, -math.inf)


def _apply_top_p(scaled: Tensor, top_p: Tensor) -> Tensor:
    """Mask (-inf) logits outside each row's top-p set. scaled [batch, k, vocab]; top_p [batch].

    A token is kept if the probability mass strictly before it (most likely first, ties by lowest
    index) is below top_p. Rows with top_p = 1 keep everything (float cumsums can reach 1 early).
    """
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)     # [batch, k, vocab]
    sorted_probs = torch.softmax(sorted_logits.double(), dim=-1)                 # [batch, k, vocab]
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    limit = top_p[:, None, None]                                                 # [batch, 1, 1]
    keep_sorted = (mass_before < limit) | (limit >= 1)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)         # [batch, k, vocab]
    return scaled.masked_fill(~keep, -math.inf)


# --------------------------------------------------------------------------------------------
# Truncation sampling of the target: p̃ (min-p, η-sampling), verified losslessly
# --------------------------------------------------------------------------------------------


def truncate_target(p: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """p [batch, k, vocab] processed target probabilities -> p̃ [batch, k, vocab] float32.

    Per row, keep the tokens v with p(v) ≥ τ and renormalize, where

        τ = max(min_p · max p,  ε),   ε = min(η, √η · exp(−H(p))),   H(p) = −Σ p log p (nats),

    each term counting only when its option is set (min-p as in vLLM and HF ``MinPLogitsWarper``;
    η-sampling as Hewitt et al. 2022 and HF ``EtaLogitsWarper``). Both set: a token must pass both.
    p is the distribution after temperature, top-k and top-p, so truncation comes last. τ never
    exceeds max p (ε ≤ exp(−H) ≤ max p), so the argmax always survives; it is also kept explicitly
    against float rounding. Rows that truncate nothing come back unchanged, bit for bit.

    Only p is truncated. Speculative decoding verifying drafts from an untruncated q against p̃ is
    lossless for p̃ (REFERENCE.md §2: any q works if the verifier uses the q the drafts came from),
    so TARGET and SPECULATIVE with the same min_p / eta sample the same distribution p̃.
    """
    if p.dim() != 3 or p.shape[0] != len(params):
        raise ValueError(f"p must be [batch, k, vocab] with batch = len(params); "
                         f"got {tuple(p.shape)} and {len(params)} params")
    rows = torch.tensor([s.truncates for s in params])                           # [batch]
    if not bool(rows.any()):
        return p
    p64 = p.double()
    min_p = torch.tensor([float(s.min_p) for s in params], dtype=torch.float64)[:, None, None]
    eta = torch.tensor([float(s.eta) for s in params], dtype=torch.float64)[:, None, None]
    top = p64.amax(-1, keepdim=True)                                             # [batch, k, 1]
    entropy = -torch.special.xlogy(p64, p64).sum(-1, keepdim=True)               # [batch, k, 1]
    epsilon = torch.minimum(eta, eta.sqrt() * torch.exp(-entropy))               # 0 where η = 0
    threshold = torch.maximum(min_p * top, epsilon)                              # [batch, k, 1]
    keep = (p64 >= threshold) | (p64 == top)                                     # [batch, k, vocab]
    kept = torch.where(keep, p64, 0.0)
    truncated = (kept / kept.sum(-1, keepdim=True)).float()                      # [batch, k, vocab]
    return torch.where(rows[:, None, None], truncated, p.float())


# --------------------------------------------------------------------------------------------
# Sparse draft distributions: q′ = q truncated to its top k tokens, renormalized
# --------------------------------------------------------------------------------------------


def truncate_top_k(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """q [..., vocab] -> (indices [..., k] int32, probs [..., k] float32), likeliest first.

    q′ = q restricted to its k likeliest tokens and renormalized. Speculative decoding stays exact
    with q′ in place of q as long as the drafter samples from q′ and the verifier tests against the
    same q′ (REFERENCE.md §2); the acceptance lost is at most the mass of q outside the top k.
    Temperature, top-k and top-p keep the order of tokens, so the argmax is always kept.
    """
    k = max(1, min(k, q.shape[-1]))
    top, indices = q.float().topk(k, dim=-1)                                     # [..., k]
    return indices.int(), top / top.sum(-1, keepdim=True)


def sparse_to_dense(indices: Tensor, probs: Tensor, vocab: int) -> Tensor:
    """(indices [..., k], probs [..., k]) -> dense [..., vocab] float32, by scatter-add.

    Adding (not assigning) lets padded slots carry any index with probability 0, so rows of a
    batch may ship different k (or nothing past their γ) without overwriting real entries.
    """
    dense = torch.zeros(*indices.shape[:-1], vocab, dtype=torch.float32)
    return dense.scatter_add_(-1, indices.long(), probs.float())


# --------------------------------------------------------------------------------------------
# Seeded randomness and plain sampling
# --------------------------------------------------------------------------------------------

DRAFT_STREAM = 0    # the drafter's sampling of draft tokens
VERIFY_STREAM = 1   # acceptance tests and the recovered / bonus token


def round_generator(seed: int, position: int, stream: int) -> torch.Generator:
    """Counter-based seeding: a CPU generator seeded from a hash of (seed, position, stream).

    A request's randomness depends only on its seed and the absolute token position, never on
    batch companions or on which replica serves it. ``stream`` is DRAFT_STREAM for the drafter's
    sampling and VERIFY_STREAM for acceptance / recovery, so the two never share uniforms.
    """
    digest = hashlib.blake2b(f"{seed}:{position}:{stream}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def _uniform(generator: torch.Generator, n: int = 1) -> Tensor:
    """n uniforms in [0, 1), float64, from one generator."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """weights [batch, vocab] ≥ 0 (need not sum to 1), u [batch] in [0, 1) -> tokens [batch].

    Picks the first token whose cumulative weight exceeds u·total, so a zero-weight token is
    never picked.
    """
    cdf = weights.double().cumsum(-1)                                            # [batch, vocab]
    threshold = u.double()[:, None] * cdf[:, -1:]                                # [batch, 1]
    tokens = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)          # [batch]
    return tokens.clamp(max=weights.shape[-1] - 1)


def sample(probs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """probs [batch, vocab] -> tokens [batch] int64.

    Exactly one uniform per row from that row's generator (inverse CDF), so generator consumption
    does not depend on the outcome.
    """
    if probs.dim() != 2 or probs.shape[0] != len(generators):
        raise ValueError(f"probs must be [batch, vocab] with batch = len(generators); "
                         f"got {tuple(probs.shape)} and {len(generators)} generators")
    u = torch.cat([_uniform(g) for g in generators]) if generators else torch.zeros(0)  # [batch]
    return _inverse_cdf(probs, u)


def sample_sparse(indices: Tensor, probs: Tensor,
                  generators: Sequence[torch.Generator]) -> Tensor:
    """A token from each row's sparse q′: indices, probs [batch, k] -> tokens [batch] int64.

    One uniform per row, like ``sample``; the token follows q′ exactly.
    """
    if probs.dim() != 2 or probs.shape[0] != len(generators) or indices.shape != probs.shape:
        raise ValueError(f"indices, probs must be [batch, k] with batch = len(generators); "
                         f"got {tuple(indices.shape)}, {tuple(probs.shape)}, {len(generators)}")
    u = torch.cat([_uniform(g) for g in generators]) if generators else torch.zeros(0)  # [batch]
    slot = _inverse_cdf(probs, u)                                                # [batch]
    return indices.long().gather(-1, slot[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Speculative cascades: the target distribution π
# --------------------------------------------------------------------------------------------


def cascade_target(p: Tensor, q: Tensor, p_raw: Tensor, q_raw: Tensor,
                   params: Sequence[CascadeParams]) -> tuple[Tensor, Tensor]:
    """The speculative-cascade target π for each row.

    p, q: processed (temperature / top-k / top-p) probabilities [batch, k, vocab];
    p_raw, q_raw: temperature-1 softmax probabilities [batch, k, vocab], used for the deferral
    decision. Returns (pi [batch, k, vocab] float32, deferred [batch, k] bool). For the
    whole-distribution rules deferred = δ (π = p); for the token rules deferred means π is not q,
    i.e. some draft mass is handed to p. Rows may have different rules and α.

    OPT multiplies α by TV(q, p); where that is 0 (p == q, e.g. the same greedy token) the rule
    reduces to max q ≥ max p whatever α is, so δ may be 1 there although π = p = q.
    """
    if not (p.shape == q.shape == p_raw.shape == q_raw.shape) or p.dim() != 3:
        raise ValueError("p, q, p_raw, q_raw must all be [batch, k, vocab]")
    if p.shape[0] != len(params):
        raise ValueError(f"{len(params)} cascade params for a batch of {p.shape[0]}")
    p, q = p.float(), q.float()
    rules = torch.tensor([int(c.rule) for c in params])                          # [batch]
    alpha = torch.tensor([float(c.alpha) for c in params], dtype=torch.float64)  # [batch]
    pi = torch.empty_like(p)                                                     # [batch, k, vocab]
    deferred = torch.empty(p.shape[:2], dtype=torch.bool)                        # [batch, k]
    for rule in sorted({c.rule for c in params}):
        rows = (rules == rule).nonzero().squeeze(1)
        args = (p[rows], q[rows], p_raw[rows], q_raw[rows], alpha[rows])
        if rule in WHOLE_DISTRIBUTION_RULES:
            pi[rows], deferred[rows] = _whole_distribution_target(rule, *args)
        else:
            pi[rows], deferred[rows] = _token_target(rule, *args)
    return pi, deferred


def _whole_distribution_target(rule: DeferralRule, p: Tensor, q: Tensor, p_raw: Tensor,
                               q_raw: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """π = (1 − δ)·q + δ·p with δ ∈ {0, 1}; alpha [batch] float64."""
    alpha = alpha[:, None]                                                       # [batch, 1]
    max_q = q_raw.double().amax(-1)                                              # [batch, k]
    max_p = p_raw.double().amax(-1)                                              # [batch, k]
    if rule == DeferralRule.CHOW:
        keep_q = max_q >= 1 - alpha
    elif rule == DeferralRule.DIFF:
        keep_q = max_q >= max_p - alpha
    else:  # OPT; TV between the distributions that are sampled, as in the reference notebook
        tv = (q.double() - p.double()).clamp(min=0).sum(-1)                      # [batch, k]
        keep_q = max_q >= max_p - alpha * tv
    defer = ~keep_q                                                              # [batch, k]
    return torch.where(defer[..., None], p, q), defer


def _token_target(rule: DeferralRule, p: Tensor, q: Tensor, p_raw: Tensor, q_raw: Tensor,
                  alpha: Tensor) -> tuple[Tensor, Tensor]:
    """π(v) = q(v)·1[v ∈ A] + (1 − Σ_{u∈A} q(u))·p(v); alpha [batch] float64."""
    alpha = alpha[:, None, None]                                                 # [batch, 1, 1]
    max_p = p_raw.double().amax(-1, keepdim=True)                                # [batch, k, 1]
    if rule == DeferralRule.TOKEN_V1:
        in_a = q_raw.double() >= max_p - alpha
    elif rule == DeferralRule.TOKEN_V2:
        in_a = p_raw.double() >= max_p - alpha
    else:  # TOKEN_V3
        in_a = p_raw.double() >= (1 - alpha) * max_p                             # [batch, k, vocab]
    kept = q * in_a                                                              # [batch, k, vocab]
    # The draft mass outside A, as a fraction of q's total: exactly 1 when A is empty (π = p) and
    # exactly 0 when A is everything (π = q), whatever the float rounding of Σ q.
    handed_over = (q * ~in_a).sum(-1, keepdim=True) / q.sum(-1, keepdim=True)    # [batch, k, 1]
    return kept + handed_over * p, handed_over.squeeze(-1) > 0


def cascade_greedy_tokens(draft_tokens: Tensor, p_raw: Tensor, q_raw_drafted: Tensor,
                          params: Sequence[CascadeParams]) -> tuple[Tensor, Tensor]:
    """Temperature 0: the one token π puts its mass on at each drafted position, without π.

    At temperature 0 the processed p is δ_a (a = argmax p) and q is δ_d (d the drafted token, the
    argmax of q), so every rule's π is δ_d where it keeps the draft and δ_a where it defers: the
    whole-distribution rules with TV(q, p) = 1[d ≠ a]; the token rules keep d iff d ∈ A, and
    q(d) = max q is the only q_raw value A reads. Reference: the argmax of ``cascade_target`` on
    the one-hot p, q and dense p_raw, q_raw (tests compare the two).

    draft_tokens [batch, k]; p_raw [batch, k, vocab] temperature-1 target probabilities;
    q_raw_drafted [batch, k] temperature-1 q of the drafted token. Returns (tokens π picks
    [batch, k], deferred [batch, k] bool), deferred as in ``cascade_target``.
    """
    if p_raw.dim() != 3 or not p_raw.shape[:2] == draft_tokens.shape == q_raw_drafted.shape:
        raise ValueError("p_raw must be [batch, k, vocab], draft_tokens and q_raw_drafted [batch, k]")
    if p_raw.shape[0] != len(params):
        raise ValueError(f"{len(params)} cascade params for a batch of {p_raw.shape[0]}")
    rules = torch.tensor([int(c.rule) for c in params])[:, None]                 # [batch, 1]
    alpha = torch.tensor([float(c.alpha) for c in params], dtype=torch.float64)[:, None]
    best = p_raw.argmax(-1)                                                      # [batch, k]
    max_p = p_raw.double().amax(-1)                                              # [batch, k]
    p_d = p_raw.double().gather(-1, draft_tokens[..., None])[..., 0]             # [batch, k]
    max_q = q_raw_drafted.double()                                               # [batch, k]
    tv = (draft_tokens != best).double()                                         # [batch, k]
    keeps = torch.stack([                            # [rules, batch, k], in DeferralRule order
        max_q >= 1 - alpha,                          # CHOW
        max_q >= max_p - alpha,                      # DIFF
        max_q >= max_p - alpha * tv,                 # OPT
        max_q >= max_p - alpha,                      # TOKEN_V1: d ∈ A ⇔ q(d) ≥ max p − α
        p_d >= max_p - alpha,                        # TOKEN_V2
        p_d >= (1 - alpha) * max_p,                  # TOKEN_V3
    ])
    keep = keeps.gather(0, (rules - 1).expand_as(best)[None])[0]                 # [batch, k]
    return torch.where(keep, draft_tokens, best), ~keep


# --------------------------------------------------------------------------------------------
# Verification: lossless rejection sampling and the greedy path
# --------------------------------------------------------------------------------------------


@dataclass
class VerifyOutput:
    num_accepted: Tensor   # [batch] int64
    tokens: Tensor         # [batch, γmax + 1] int64: accepted drafts, then the recovered or bonus
                           # token, then -1 padding

    @property
    def num_emitted(self) -> Tensor:
        return self.num_accepted + 1


def verify(draft_tokens: Tensor, num_drafts: Tensor, q: Tensor, p: Tensor,
           generators: Sequence[torch.Generator], lenience: Tensor | None = None) -> VerifyOutput:
    """Rejection sampling for several sequences at once, each with its own γ: lossless, or lossy
    with a lenience l per row.

    draft_tokens [batch, γmax] int64 (entries beyond num_drafts ignored); num_drafts [batch]
    (0 = plain sampling from p[:, 0]); q [batch, γmax, vocab] the distributions the drafts were
    sampled from; p [batch, γmax + 1, vocab] the target (p̃, or π) distributions; lenience [batch]
    in (0, 1], or None for all 1.

    Draft x_i is accepted with probability min(1, p(x_i)/(l·q(x_i))); at the first rejection the
    recovered token comes from norm(max(0, p − q)) at that position (from p itself when nothing is
    left, i.e. p ≤ q everywhere); if all are accepted the bonus token comes from p at position
    num_drafts. Row b consumes exactly num_drafts[b] + 1 uniforms from generators[b]: one
    acceptance uniform per drafted position (drawn even after a rejection), then one for the
    emitted token. l = 1 is the lossless path exactly: l·q(x) = q(x) bit for bit.

    The lenient output (Leviathan et al. 2023, App. A.5; the reference notebook's
    ``speed_sampling_*`` functions use the same test and residual). At a drafted position, v is
    accepted with mass q(v)·min(1, p(v)/(l·q(v))) = min(q(v), p(v)/l), so

        f_l(v) = min(q(v), p(v)/l) + (1 − β_l) · norm(max(0, p − q))(v),
        β_l = Σ_u min(q(u), p(u)/l)   (the probability that a draft is accepted).

    The residual stays norm(max(0, p − q)): acceptance already gives every token with p < q at
    least its p (and the others exactly q ≤ p), so the rejected mass 1 − β_l = Σ(p − q)⁺ −
    Σ(min(q, p/l) − p)⁺ belongs only where p still exceeds q, in proportion to what is missing.
    Then TV(f_l, p) = Σ_v (min(q(v), p(v)/l) − p(v))⁺, the least any residual can reach with this
    acceptance test; at l = 1 the excess is 0 and f_1 = p. norm(max(0, p − l·q)) would also put
    mass on tokens with l·q ≤ p < q, which acceptance already over-serves (tests show it fails).
    """
    uniforms = _draw_verify_uniforms(num_drafts, draft_tokens.shape[1], generators)
    return _verify_with_uniforms(draft_tokens, num_drafts, q, p, uniforms, lenience)


def _draw_verify_uniforms(num_drafts: Tensor, gamma_max: int,
                          generators: Sequence[torch.Generator]) -> Tensor:
    """-> uniforms [batch, γmax + 1] float64: columns 0..n−1 test the drafts, column n emits."""
    if len(generators) != num_drafts.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {num_drafts.shape[0]}")
    uniforms = torch.zeros(len(generators), gamma_max + 1, dtype=torch.float64)
    for b, (n, generator) in enumerate(zip(num_drafts.tolist(), generators)):
        uniforms[b, :n] = _uniform(generator, n)
        uniforms[b, n] = _uniform(generator)[0]   # the draw sample() would make
    return uniforms


def _acceptance_probability(p_x: Tensor, q_x: Tensor) -> Tensor:
    """min(1, p(x)/q(x)) for drafted tokens x; [batch, γ] float64. q(x) = 0 counts as ratio ∞."""
    p_x, q_x = p_x.double(), q_x.double()
    ratio = p_x / q_x.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(q_x > 0, ratio.clamp(max=1), (p_x > 0).double())


def _residual(p: Tensor, q: Tensor) -> Tensor:
    """max(0, p − q) (unnormalized) [batch, vocab] float64; p itself where no mass is left."""
    residual = (p.double() - q.double()).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0
    return torch.where(empty, p.double(), residual)


def _check_verify_shapes(draft_tokens: Tensor, num_drafts: Tensor, q: Tensor, p: Tensor) -> None:
    batch, gamma_max = draft_tokens.shape
    if num_drafts.shape != (batch,):
        raise ValueError(f"num_drafts must be [batch]={batch}, got {tuple(num_drafts.shape)}")
    if p.dim() != 3 or p.shape[:2] != (batch, gamma_max + 1):
        raise ValueError(f"p must be [batch, γmax + 1, vocab] = [{batch}, {gamma_max + 1}, V], "
                         f"got {tuple(p.shape)}")
    if q.shape != (batch, gamma_max, p.shape[2]):
        raise ValueError(f"q must be [batch, γmax, vocab] = [{batch}, {gamma_max}, "
                         f"{p.shape[2]}], got {tuple(q.shape)}")
    if batch and (num_drafts.min() < 0 or num_drafts.max() > gamma_max):
        raise ValueError(f"num_drafts must be in [0, {gamma_max}]")


def _verify_with_uniforms(draft_tokens: Tensor, num_drafts: Tensor, q: Tensor, p: Tensor,
                          uniforms: Tensor, lenience: Tensor | None = None) -> VerifyOutput:
    """``verify`` with pre-drawn uniforms [batch, γmax + 1] (layout of _draw_verify_uniforms)."""
    _check_verify_shapes(draft_tokens, num_drafts, q, p)
    if lenience is not None and lenience.shape != (draft_tokens.shape[0],):
        raise ValueError(f"lenience must be [batch]={draft_tokens.shape[0]}, "
                         f"got {tuple(lenience.shape)}")
    batch, gamma_max = draft_tokens.shape
    rows = torch.arange(batch)
    positions = torch.arange(gamma_max)

    # 1. Acceptance test at every drafted position: u_i < min(1, p(x_i) / (l·q(x_i))), i.e. the
    #    lossless test against l·q (l > 0 keeps q's zeros; l = 1 leaves q(x) bit for bit).
    drafted = positions[None, :] < num_drafts[:, None]                           # [batch, γ]
    x = torch.where(drafted, draft_tokens, 0)[..., None]                         # [batch, γ, 1]
    p_x = p[:, :gamma_max].gather(-1, x).squeeze(-1)                             # [batch, γ]
    q_x = q.gather(-1, x).squeeze(-1)                                            # [batch, γ]
    if lenience is not None:
        q_x = lenience.double()[:, None] * q_x.double()                          # [batch, γ]
    accepted = drafted & (uniforms[:, :gamma_max] < _acceptance_probability(p_x, q_x))

    # 2. Accepted prefix: drafts up to the first rejection.
    num_accepted = accepted.long().cumprod(-1).sum(-1)                           # [batch]

    # 3. The emitted token at position num_accepted: recovered from the residual after a
    #    rejection, the bonus from p when every draft was accepted.
    p_e = p[rows, num_accepted]                                                  # [batch, vocab]
    rejected = num_accepted < num_drafts                                         # [batch]
    if gamma_max > 0:
        q_e = q[rows, num_accepted.clamp(max=gamma_max - 1)]                     # [batch, vocab]
        emit_from = torch.where(rejected[:, None], _residual(p_e, q_e), p_e.double())
    else:
        emit_from = p_e
    emitted = _inverse_cdf(emit_from, uniforms[rows, num_drafts])                # [batch]

    # 4. Output: accepted drafts, then the emitted token, padded with -1.
    tokens = torch.full((batch, gamma_max + 1), -1, dtype=torch.long)           # [batch, γ + 1]
    keep = torch.arange(gamma_max + 1)[None, :] < num_accepted[:, None]
    tokens[:, :gamma_max] = torch.where(keep[:, :gamma_max], draft_tokens, -1)
    tokens[rows, num_accepted] = emitted
    return VerifyOutput(num_accepted=num_accepted, tokens=tokens)


def verify_greedy(draft_tokens: Tensor, num_drafts: Tensor, p: Tensor) -> VerifyOutput:
    """The temperature-0 path: accept while draft == argmax p, then emit argmax p. No randomness.

    draft_tokens [batch, γmax], num_drafts [batch], p [batch, γmax + 1, vocab] probs or logits.
    """
    batch, gamma_max = draft_tokens.shape
    if p.dim() != 3 or p.shape[:2] != (batch, gamma_max + 1):
        raise ValueError(f"p must be [batch, γmax + 1, vocab], got {tuple(p.shape)}")
    return verify_greedy_tokens(draft_tokens, num_drafts, p.argmax(-1))


def verify_greedy_tokens(draft_tokens: Tensor, num_drafts: Tensor, best: Tensor) -> VerifyOutput:
    """verify_greedy given the target's token per position, best [batch, γmax + 1] (argmax p, or
    the token of a greedy cascade's π on drafted positions: ``cascade_greedy_tokens``)."""
    batch, gamma_max = draft_tokens.shape
    rows = torch.arange(batch)
    drafted = torch.arange(gamma_max)[None, :] < num_drafts[:, None]             # [batch, γ]
    matches = drafted & (draft_tokens == best[:, :gamma_max])
    num_accepted = matches.long().cumprod(-1).sum(-1)                            # [batch]
    tokens = torch.full((batch, gamma_max + 1), -1, dtype=torch.long)
    keep = torch.arange(gamma_max)[None, :] < num_accepted[:, None]
    tokens[:, :gamma_max] = torch.where(keep, draft_tokens, -1)
    tokens[rows, num_accepted] = best[rows, num_accepted]
    return VerifyOutput(num_accepted=num_accepted, tokens=tokens)
