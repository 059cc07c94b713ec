"""The generation loop, shared by the in-process engine and the distributed router.

One request, one coroutine. Each round commits ≥ 1 token. The modes differ only in how a round
proposes and checks tokens (`ROUNDS`); the loop around them — committing, stop conditions, text
deltas, stats, releasing KV entries — is the same.

Pipelining (speculative and cascade modes): while the verifier scores block k, the drafter already
drafts block k+1 from committed + block k, its first token being the draft's guess of the bonus
token. If block k is fully accepted and the guess equals the bonus, block k+1 is used as is;
otherwise it is discarded (the drafter's cache is rolled back by the next call's reconciliation).
A block is drafted ahead only when the request's running acceptance says it will likely be used
(`_State.draft_ahead_pays`); the discarded tokens are counted in RequestStats.
Because draft sampling is seeded by absolute position, a reused block is exactly the block a fresh
draft would produce: pipelining changes speed, never output.

γ: a request that leaves num_draft_tokens unset is steered by the speculation controller
(engine.controller), which picks γ ∈ {0 … γmax} and whether to draft ahead every round from the
request's acceptance and the replicas' measured costs and load; γ = 0 is a plain target step.
An explicit γ is used as given (or as the start of transformers' schedule with `adaptive`).
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from speccascade.engine.controller import RequestControl, SpeculationController
from speccascade.engine.seam import (DEFAULT_DRAFT_AHEAD_WASTE_COST, DEFAULT_DRAFT_TOP_K,
                                     DraftRequest, DraftResult, Drafter, RequestStats, Verifier,
                                     VerifyRequest)
from speccascade.engine.transcript import Transcript
from speccascade.sampling import CascadeParams, ParamError, SamplingParams


DEFAULT_NUM_DRAFT_TOKENS = 4  # γ of DRAFT mode and the start of `adaptive` when γ is unset


class Mode(enum.IntEnum):
    TARGET = 1       # autoregressive target model (the quality reference)
    DRAFT = 2        # autoregressive draft model (the speed reference)
    SPECULATIVE = 3  # lossless speculative decoding
    CASCADE = 4      # speculative cascade: verify against π from a deferral rule and α


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    mode: Mode = Mode.SPECULATIVE
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_draft_tokens: int | None = None       # γ; None = the controller chooses it every round
    adaptive: bool = False                    # transformers' schedule, from num_draft_tokens or 4
    max_num_draft_tokens: int = 8             # adaptive and controlled γ stay within this
    cascade: CascadeParams | None = None      # required for CASCADE
    stop: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    # Draft block k+1 during verification: None = when the gate says it pays (draft_ahead_pays),
    # True = always, False = never (draft and verify in turn).
    pipelined: bool | None = None
    draft_stop_below: float = 0.0             # stop a draft block early when the draft is unsure
    max_seq_len: int = 1 << 30                # model context; blocks never run past it
    draft_top_k: int = DEFAULT_DRAFT_TOP_K    # k of the shipped q′ (sampled rounds)
    # Share of a wasted draft-ahead's compute that delays the verification (0 = drafter on its own
    # device: always draft ahead; 1 = fully shared cores). Sets the draft-ahead threshold.
    draft_ahead_waste_cost: float = DEFAULT_DRAFT_AHEAD_WASTE_COST

    def __post_init__(self):
        # Checked here, where every caller (router, in-process engine, CLI) builds a request.
        if len(self.prompt_ids) + self.max_new_tokens > self.max_seq_len:
            raise ParamError("max_new_tokens", f"prompt ({len(self.prompt_ids)} tokens) + "
                             f"max_new_tokens ({self.max_new_tokens}) exceeds the model context "
                             f"of {self.max_seq_len} tokens")
        s, mode = self.sampling, Mode(self.mode)
        if s.lenience != 1 and mode != Mode.SPECULATIVE:
            raise ParamError("lenience", f"lenience (lossy speculative decoding) applies to mode "
                             f"SPECULATIVE only; leave it unset for {mode.name}")
        for name in ("min_p", "eta"):
            if getattr(s, name) > 0 and mode not in (Mode.TARGET, Mode.SPECULATIVE):
                raise ParamError(name, f"{name} truncates the target's distribution: it applies "
                                 f"to modes TARGET and SPECULATIVE only, not {mode.name}")


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    finish_reason: str | None   # "eos" | "length" | "stop" | None while running
    stats: RequestStats


@dataclass
class _Speculation:
    """Block k+1, drafted while block k is being verified."""
    base: list[int]                  # committed + block k: what the speculation assumed
    task: asyncio.Task               # -> DraftResult: [bonus guess, next block...]


@dataclass
class _State:
    request: GenerationRequest
    drafter: Drafter
    verifier: Verifier
    transcript: Transcript
    committed: list[int]
    stats: RequestStats = field(default_factory=RequestStats)
    speculation: _Speculation | None = None
    control: RequestControl | None = None     # set when the controller chooses γ
    current_gamma: int = 0
    # Running estimates (exponential averages) of P(block fully accepted) and of the per-token
    # acceptance, the latter standing for P(bonus guess = bonus). Priors: no evidence either way.
    full_rate: float = 0.5
    token_rate: float = 0.5

    def __post_init__(self):
        self.current_gamma = self.request.num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS

    def room(self, tokens: list[int]) -> int:
        """Tokens that may be drafted after `tokens` so that the verified result (drafts plus the
        recovered or bonus token) stays inside the model context."""
        return self.request.max_seq_len - len(tokens) - 1

    def gamma_cap(self) -> int:
        """The most γ may be this round: never draft past max_new_tokens or the model context."""
        return max(0, min(self.transcript.remaining - 1, self.room(self.committed)))

    def adapt_gamma(self, drafted: int, accepted: int) -> None:
        """Transformers' heuristic schedule: +2 after a fully accepted block, −1 otherwise."""
        if self.request.adaptive:
            step = 2 if accepted == drafted else -1
            self.current_gamma = max(1, min(self.request.max_num_draft_tokens,
                                            self.current_gamma + step))

    def observe(self, drafted: int, accepted: int, weight: float = 0.25) -> None:
        self.full_rate += weight * (float(accepted == drafted) - self.full_rate)
        self.token_rate += weight * (accepted / max(drafted, 1) - self.token_rate)

    def draft_ahead_pays(self, gamma: int) -> bool:
        """Draft block k+1 during verification only when its expected saving beats its expected
        waste (REFERENCE.md §11): used with probability P = P(all γ accepted)·P(guess = bonus),
        it saves γ draft steps of latency; unused, its γ + 1 steps cost f (waste cost) each.
        P·γ ≥ (1 − P)·f·(γ + 1)  ⇔  P ≥ f(γ + 1) / (γ + f(γ + 1))."""
        f = self.request.draft_ahead_waste_cost
        used = self.full_rate * self.token_rate
        return used * gamma >= (1 - used) * f * (gamma + 1)

    def draft_request(self, tokens: list[int], gamma: int) -> DraftRequest:
        r = self.request
        # Sampled rounds ship q′ over the top k; greedy cascades only the drafted token's raw q
        # (k = 1); greedy speculative rounds nothing (verification needs only the tokens).
        top_k = r.draft_top_k if not r.sampling.greedy else int(r.cascade is not None)
        return DraftRequest(seq_id=r.request_id, tokens=tokens, num_draft_tokens=gamma,
                            sampling=r.sampling, position=len(tokens), ship_top_k=top_k,
                            ship_raw=r.cascade is not None, stop_below=r.draft_stop_below)


async def _verify(state: _State, request: VerifyRequest):
    started = time.perf_counter()
    result = await state.verifier.verify(request)
    if state.control is not None:
        state.control.observe_verify(result.cost, (time.perf_counter() - started) * 1000,
                                     result.served_ms)
    return result


async def _target_round(state: _State) -> list[int]:
    r = state.request
    result = await _verify(state, VerifyRequest(r.request_id, state.committed, [], r.sampling))
    state.stats.verify_ms += result.verify_ms
    state.stats.replicas.add(f"verifier:{result.replica}")
    return result.emitted


async def _draft_round(state: _State) -> list[int]:
    gamma = max(1, min(state.current_gamma, state.transcript.remaining))
    block = await _fresh_draft(state, state.committed, gamma)
    state.stats.replicas.add(f"drafter:{block.replica}")
    return block.tokens


async def _fresh_draft(state: _State, tokens: list[int], gamma: int) -> DraftResult:
    """A draft the loop waits for: all of its compute is on the critical path."""
    started = time.perf_counter()
    block = await state.drafter.draft(state.draft_request(tokens, gamma))
    if state.control is not None:
        state.control.observe_draft(block.cost, (time.perf_counter() - started) * 1000,
                                    block.served_ms)
    state.stats.draft_ms += block.draft_ms
    state.stats.exposed_draft_ms += block.draft_ms
    return block


async def _take_block(state: _State, gamma: int) -> DraftResult:
    """Block k: the speculated one when its assumption held, else a fresh draft."""
    spec, state.speculation = state.speculation, None
    if spec is not None:
        waiting_since = time.perf_counter()
        guess = await spec.task  # always awaited: one call per sequence in flight on the drafter
        waited_ms = (time.perf_counter() - waiting_since) * 1000
        # Paid for whether used or not; only the part still running after the verification
        # (the wait) was on the critical path.
        state.stats.draft_ms += guess.draft_ms
        state.stats.exposed_draft_ms += min(waited_ms, guess.draft_ms)
        state.stats.drafted_ahead += len(guess.tokens)
        if state.control is not None:  # its cost report is news; its wall time overlapped
            state.control.observe_draft(guess.cost)
        if spec.base + guess.tokens[:1] == state.committed and len(guess.tokens) > 1:
            block = guess.tokens[1: gamma + 1]
            state.stats.discarded_draft_tokens += len(guess.tokens) - 1 - len(block)
            return DraftResult(guess.seq_id, block,
                               None if guess.q is None else guess.q[1: gamma + 1],
                               guess.draft_ms, guess.replica)
        state.stats.discarded_draft_tokens += len(guess.tokens)
    return await _fresh_draft(state, state.committed, gamma)


async def _speculative_round(state: _State) -> list[int]:
    r = state.request
    if state.control is not None:
        decision = state.control.choose(state.gamma_cap(), r.pipelined)
        gamma, ahead = decision.gamma, decision.ahead
    else:
        gamma = min(state.current_gamma, state.gamma_cap())
        ahead = r.pipelined is not False and (r.pipelined or state.draft_ahead_pays(gamma))
    state.stats.count_gamma(gamma)
    if gamma == 0:
        return await _target_round(state)
    # 1. Draft block k (or reuse the block drafted during the previous verification).
    block = await _take_block(state, gamma)
    state.stats.replicas.add(f"drafter:{block.replica}")
    # 2. Verify it; meanwhile draft block k+1 assuming block k is accepted.
    verifying = asyncio.ensure_future(_verify(state, VerifyRequest(
        r.request_id, state.committed, block.tokens, r.sampling, block.q, r.cascade)))
    if ahead and state.transcript.remaining > len(block.tokens) + 1:
        base = state.committed + block.tokens
        # The bonus guess and block k+1, cut where they would run past the model context.
        size = min(gamma + 1, state.room(base))
        if size > 1:
            state.speculation = _Speculation(base, asyncio.ensure_future(
                state.drafter.draft(state.draft_request(base, size))))
    result = await verifying
    # 3. Account.
    state.stats.drafted += len(block.tokens)
    state.stats.accepted += result.num_accepted
    state.stats.deferrals += result.deferred
    state.stats.verify_ms += result.verify_ms
    state.stats.replicas.add(f"verifier:{result.replica}")
    state.adapt_gamma(len(block.tokens), result.num_accepted)
    state.observe(len(block.tokens), result.num_accepted)
    if state.control is not None:
        state.control.observe_round(len(block.tokens), result.num_accepted)
    return result.emitted


ROUNDS: dict[Mode, Callable[[_State], Awaitable[list[int]]]] = {
    Mode.TARGET: _target_round,
    Mode.DRAFT: _draft_round,
    Mode.SPECULATIVE: _speculative_round,
    Mode.CASCADE: _speculative_round,  # same loop; VerifyRequest.cascade selects π
}


def controlled(request: GenerationRequest) -> bool:
    """Whether the controller chooses this request's γ: speculative or cascade, γ left unset."""
    return (request.mode in (Mode.SPECULATIVE, Mode.CASCADE) and request.num_draft_tokens is None
            and not request.adaptive)


async def generate(request: GenerationRequest, drafter: Drafter, verifier: Verifier,
                   tokenizer, controller: SpeculationController | None = None
                   ) -> AsyncIterator[Delta]:
    """Yield one Delta per round; the last one has finish_reason set and the final stats.
    `controller` holds the traffic priors shared by the caller's requests (a fresh one if None)."""
    started = time.perf_counter()
    transcript = Transcript(tokenizer, request.max_new_tokens, request.stop, request.eos_token_ids)
    state = _State(request, drafter, verifier, transcript, list(request.prompt_ids))
    if controlled(request):
        state.control = (controller or SpeculationController()).start(request)
    round_fn = ROUNDS[request.mode]
    try:
        while transcript.finish_reason is None:
            emitted = await round_fn(state)
            state.stats.rounds += 1
            state.committed.extend(emitted)
            new_ids, text = transcript.commit(emitted)
            now_ms = (time.perf_counter() - started) * 1000
            if not state.stats.ttft_ms:
                state.stats.ttft_ms = now_ms
            state.stats.total_ms = now_ms
            yield Delta(new_ids, text, transcript.finish_reason, state.stats)
    finally:
        await _release(state)


# Releases still running after their request's task was cancelled again (kept referenced).
_RELEASING: set[asyncio.Future] = set()


async def _release(state: _State) -> None:
    """Free this request's KV entries on both sides, whatever ended the request.

    Shielded as a whole: a request that was cancelled can be cancelled again while it unwinds
    (Ray Serve does so to a unary call whose gRPC client went away — measured: the second release
    never ran and the verifier kept the entry). Then the releases finish in the background."""
    task = asyncio.ensure_future(_release_both(state))
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)
    await asyncio.shield(task)


async def _release_both(state: _State) -> None:
    seq_id = state.request.request_id
    if state.speculation is not None:  # let the drafter finish first, or it would re-create the entry
        with contextlib.suppress(BaseException):
            await state.speculation.task
    for side in (state.drafter, state.verifier):
        with contextlib.suppress(Exception):
            await side.release(seq_id)


async def generate_all(request: GenerationRequest, drafter: Drafter, verifier: Verifier,
                       tokenizer, controller: SpeculationController | None = None) -> Delta:
    """Run a request to completion: one Delta with all token ids and the whole text."""
    ids, texts = [], []
    last = None
    async for delta in generate(request, drafter, verifier, tokenizer, controller):
        ids.extend(delta.token_ids)
        texts.append(delta.text)
        last = delta
    return Delta(ids, "".join(texts), last.finish_reason, last.stats)
