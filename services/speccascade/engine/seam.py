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

from speccascade.sampling import CascadeParams, SamplingParams


# Draft logits travel from drafter to router to verifier in half precision: 4 rows × 8192 logits
# are 64 KB, under Ray's 100 KB limit for objects passed inline. Measured here: an actor round trip
# with 4×8192 logits took 2.0 ms in fp16 and 6.2 ms in fp32 (the object store path). The drafter
# samples from the rounded logits, so q is the same on both sides and verification stays exact.
DRAFT_LOGITS_DTYPE = torch.float16


@dataclass(frozen=True)
class DraftRequest:
    seq_id: str
    tokens: list[int]          # sequence to continue (committed, or committed + speculated block)
    num_draft_tokens: int      # γ for this round
    sampling: SamplingParams
    position: int              # absolute index of the first token to draft (= len(tokens))
    want_logits: bool = False  # ship draft logits for sampled or cascade verification
    stop_below: float = 0.0    # stop drafting early when the draft's top probability < this


@dataclass
class DraftResult:
    seq_id: str
    tokens: list[int]                      # drafted tokens, 1..γ of them
    logits: torch.Tensor | None = None     # [len(tokens), vocab] DRAFT_LOGITS_DTYPE, when asked for
    draft_ms: float = 0.0                  # model compute time for this call
    replica: str = ""


@dataclass(frozen=True)
class VerifyRequest:
    seq_id: str
    tokens: list[int]               # committed sequence (prompt + generated so far)
    draft_tokens: list[int]         # γ proposals to verify; empty = plain target step
    sampling: SamplingParams
    draft_logits: torch.Tensor | None = None  # [γ, vocab]; None only for greedy speculative rounds
    cascade: CascadeParams | None = None      # None = lossless speculative decoding


@dataclass
class VerifyResult:
    seq_id: str
    num_accepted: int               # drafts accepted
    emitted: list[int]              # accepted drafts + one recovered/bonus token
    deferred: int = 0               # cascade: positions where π deferred to the target
    verify_ms: float = 0.0
    replica: str = ""


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
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    replicas: set[str] = field(default_factory=set)

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
