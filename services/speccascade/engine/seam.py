"""The drafter/verifier seam: dataclass payloads and the two async interfaces.

The same generation loop (`speccascade.engine.loop`) drives a local drafter and verifier in process
and remote Ray Serve deployments in the service. The caller (engine or router) owns the committed
token sequence — the single source of truth. Every call carries the full sequence the callee must
continue from; a replica reconciles its KV cache against it (longest common prefix, roll back,
extend), so rejections, pipelined speculation and fail-over to a fresh replica need no extra
protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from speccascade.engine.costs import CostReport
from speccascade.sampling import CascadeParams, SamplingParams


from speccascade.engine.defaults import DEFAULT_DRAFT_AHEAD_WASTE_COST, DEFAULT_DRAFT_TOP_K  # noqa: F401


@dataclass(frozen=True)
class SparseDraft:
    """The draft distribution q′ at each drafted position, as the drafter sampled from it.

    q′ is the processed (temperature / top-k / top-p) q truncated to its k likeliest tokens and
    renormalized (`sampling.truncate_top_k`). The verifier tests against exactly this q′, so
    speculative decoding stays lossless w.r.t. p (REFERENCE.md §2) while a round ships
    γ·k·(4 + 4 [+ 4]) bytes instead of γ·vocab logits. Greedy cascades ship k = 1 (the drafted
    token, q′ = 1) plus `raw`, all their deferral rules need at temperature 0.
    """
    indices: torch.Tensor               # [len, k] int32, likeliest first
    probs: torch.Tensor                 # [len, k] float32: q′ at indices, rows sum to 1
    raw: torch.Tensor | None = None     # [len, k] float32: temperature-1 q at indices (cascades)

    def __getitem__(self, rows: slice) -> "SparseDraft":
        return SparseDraft(self.indices[rows], self.probs[rows],
                           None if self.raw is None else self.raw[rows])

    def __reduce__(self):
        # Crosses two Ray hops a round. Plain bytes travel inline in Ray's message; torch tensors
        # (~100 µs each to pickle) and numpy arrays (out-of-band buffers) cost about 1.5 ms more
        # per hop (measured), which made a greedy cascade round dearer than a speculative one.
        parts = [(t.numpy().tobytes(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
                 for t in (self.indices, self.probs, self.raw) if t is not None]
        return (_sparse_from_bytes, tuple(parts))


def _sparse_from_bytes(*parts) -> SparseDraft:
    tensors = [torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).view(shape)
               for data, dtype, shape in parts]
    return SparseDraft(*tensors)


@dataclass(frozen=True)
class DraftRequest:
    seq_id: str
    tokens: list[int]          # sequence to continue (committed, or committed + speculated block)
    num_draft_tokens: int      # γ for this round
    sampling: SamplingParams
    position: int              # absolute index of the first token to draft (= len(tokens))
    ship_top_k: int = 0        # ship q′ over this many tokens per position; 0 = ship nothing
    ship_raw: bool = False     # also ship temperature-1 q at the same indices (cascade decisions)
    stop_below: float = 0.0    # stop drafting early when the draft's top probability < this


@dataclass
class DraftResult:
    seq_id: str
    tokens: list[int]                      # drafted tokens, 1..γ of them
    q: SparseDraft | None = None           # what the tokens were sampled from, when asked for
    draft_ms: float = 0.0                  # model compute time for this call
    replica: str = ""
    served_ms: float = 0.0                 # time the replica held the call (queue + forward)
    cost: CostReport | None = None         # the drafter's cost fit and load (controller)


@dataclass(frozen=True)
class VerifyRequest:
    seq_id: str
    tokens: list[int]               # committed sequence (prompt + generated so far)
    draft_tokens: list[int]         # γ proposals to verify; empty = plain target step
    sampling: SamplingParams
    draft_q: SparseDraft | None = None  # q′ of the drafts; None only for greedy speculative rounds
    cascade: CascadeParams | None = None      # None = lossless speculative decoding


@dataclass
class VerifyResult:
    seq_id: str
    num_accepted: int               # drafts accepted
    emitted: list[int]              # accepted drafts + one recovered/bonus token
    deferred: int = 0               # cascade: positions where π deferred to the target
    verify_ms: float = 0.0
    replica: str = ""
    served_ms: float = 0.0          # time the replica held the call (queue + forward)
    cost: CostReport | None = None  # the verifier's cost fit and load (controller)


class Drafter(Protocol):
    async def draft(self, request: DraftRequest) -> DraftResult: ...

    async def release(self, seq_id: str) -> None: ...


class Verifier(Protocol):
    async def verify(self, request: VerifyRequest) -> VerifyResult: ...

    async def release(self, seq_id: str) -> None: ...


@dataclass
class RequestStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    deferrals: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    exposed_draft_ms: float = 0.0  # draft compute the loop waited for (on the critical path)
    drafted_ahead: int = 0         # tokens drafted during verification (bonus guess + block k+1)
    discarded_draft_tokens: int = 0  # of those, thrown away because the assumption failed
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    replicas: set[str] = field(default_factory=set)
    # Rounds by the γ they drafted (index γ; 0 = a plain target step), speculative/cascade modes.
    gamma_histogram: list[int] = field(default_factory=list)

    def count_gamma(self, gamma: int) -> None:
        if len(self.gamma_histogram) <= gamma:
            self.gamma_histogram.extend([0] * (gamma + 1 - len(self.gamma_histogram)))
        self.gamma_histogram[gamma] += 1

    @property
    def mean_gamma(self) -> float:
        """Mean γ over the rounds counted in gamma_histogram (0 when none)."""
        n = sum(self.gamma_histogram)
        return sum(g * c for g, c in enumerate(self.gamma_histogram)) / n if n else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification round, counting the recovered/bonus token (vLLM's)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def hidden_draft_ms(self) -> float:
        """Draft compute that ran while a verification did: the rest of draft_ms."""
        return max(0.0, self.draft_ms - self.exposed_draft_ms)

    @property
    def overlap_fraction(self) -> float:
        return self.hidden_draft_ms / self.draft_ms if self.draft_ms else 0.0
