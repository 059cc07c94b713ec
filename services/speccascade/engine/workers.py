"""DraftWorker and VerifyWorker: plain classes that turn batches of seam requests into forwards.

They are what a drafter or verifier replica *is*; the in-process engine calls them directly and the
Ray Serve deployments wrap them. Randomness is counter-based (`sampling.round_generator`): a token
drawn at absolute position t of a request uses a generator seeded by (seed, t, stream), so output
depends only on the request — not on batch companions, replica, or pipelining.
"""
from __future__ import annotations

import os
import time

import torch

from speccascade import sampling
from speccascade.engine.seam import (DRAFT_LOGITS_DTYPE, DraftRequest, DraftResult, VerifyRequest,
                                     VerifyResult)
from speccascade.models.runner import ModelRunner


def _replica_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


class _Worker:
    """A model runner and the name of the replica it lives in."""

    def __init__(self, model, *, max_live_seqs: int = 64, max_seq_len: int | None = None,
                 idle_evict_s: float = 600.0, kv_cache_tokens: int | None = None):
        self.runner = ModelRunner(model, max_live_seqs=max_live_seqs, max_seq_len=max_seq_len,
                                  idle_evict_s=idle_evict_s, kv_cache_tokens=kv_cache_tokens)
        self.replica_name = _replica_name()

    def live_sequences(self) -> int:
        return self.runner.live_sequences()

    def release(self, seq_id: str) -> None:
        self.runner.release(seq_id)


class DraftWorker(_Worker):
    def draft_batch(self, requests: list[DraftRequest]) -> list[DraftResult]:
        """γ single-token steps, all sequences of the batch in each step."""
        started = time.perf_counter()
        sequences = {r.seq_id: list(r.tokens) for r in requests}
        drafted: dict[str, list[int]] = {r.seq_id: [] for r in requests}
        logits_out: dict[str, list[torch.Tensor]] = {r.seq_id: [] for r in requests}
        active = list(requests)
        step = 0
        while active:
            logits = self.runner.forward_batch(
                [(r.seq_id, sequences[r.seq_id], 1) for r in active])  # [batch, 1, vocab]
            wanted = [r.want_logits for r in active]
            if any(wanted):  # greedy speculative batches ship no logits
                shipped = torch.tensor(wanted)[:, None, None]  # [batch, 1, 1]
                logits = torch.where(shipped, logits.to(DRAFT_LOGITS_DTYPE).to(logits.dtype), logits)
            q = sampling.process_logits(logits, [r.sampling for r in active])  # [batch, 1, vocab]
            tokens = self._sample(q[:, 0], active, step)  # [batch]
            still_active = []
            for row, request in enumerate(active):
                unsure = (request.stop_below > 0 and step > 0
                          and logits[row, 0].softmax(-1).max().item() < request.stop_below)
                if unsure:  # the draft doubts this token: stop here rather than waste a verify slot
                    continue
                token = int(tokens[row])
                drafted[request.seq_id].append(token)
                sequences[request.seq_id].append(token)
                if request.want_logits:
                    logits_out[request.seq_id].append(logits[row, 0].to(DRAFT_LOGITS_DTYPE))
                if len(drafted[request.seq_id]) < request.num_draft_tokens:
                    still_active.append(request)
            active = still_active
            step += 1
        elapsed = (time.perf_counter() - started) * 1000
        return [DraftResult(
            seq_id=r.seq_id, tokens=drafted[r.seq_id],
            logits=torch.stack(logits_out[r.seq_id]) if r.want_logits else None,
            draft_ms=elapsed, replica=self.replica_name) for r in requests]

    @staticmethod
    def _sample(q: torch.Tensor, requests: list[DraftRequest], step: int) -> torch.Tensor:
        if all(r.sampling.greedy for r in requests):
            return q.argmax(-1)
        generators = [sampling.round_generator(r.sampling.seed, r.position + step,
                                               sampling.DRAFT_STREAM) for r in requests]
        return sampling.sample(q, generators)


class VerifyWorker(_Worker):
    def verify_batch(self, requests: list[VerifyRequest]) -> list[VerifyResult]:
        started = time.perf_counter()
        # Row b's logits fill [b, :γ_b + 1]; columns past them are padding.
        p_logits = self.runner.forward_batch(
            [(r.seq_id, r.tokens + r.draft_tokens, len(r.draft_tokens) + 1) for r in requests]
        ).cpu()  # [batch, γ+1, vocab]
        batch, gamma, vocab = p_logits.shape[0], p_logits.shape[1] - 1, p_logits.shape[-1]
        drafts = torch.tensor([r.draft_tokens + [0] * (gamma - len(r.draft_tokens))
                               for r in requests], dtype=torch.long)  # [batch, γ]
        drafts = drafts.view(batch, gamma)  # γ = 0: a [batch, 0] tensor, not [batch]
        num_drafts = torch.tensor([len(r.draft_tokens) for r in requests])  # [batch]
        params = [r.sampling for r in requests]
        deferred = torch.zeros(batch, max(gamma, 1), dtype=torch.bool)  # [batch, γ]
        if all(r.sampling.greedy and r.cascade is None for r in requests):
            out = sampling.verify_greedy(drafts, num_drafts, p_logits)
        else:
            p = sampling.process_logits(p_logits, params)  # [batch, γ+1, vocab]
            q = self._draft_probs(requests, drafts, gamma, vocab)  # [batch, γ, vocab]
            if gamma and any(r.cascade is not None for r in requests):
                p, deferred = self._cascade(requests, p, q, p_logits, gamma, vocab)
            generators = [sampling.round_generator(r.sampling.seed, len(r.tokens),
                                                   sampling.VERIFY_STREAM) for r in requests]
            out = sampling.verify(drafts, num_drafts, q, p, generators)
        elapsed = (time.perf_counter() - started) * 1000
        results = []
        for row, request in enumerate(requests):
            accepted = int(out.num_accepted[row])
            examined = min(accepted + 1, len(request.draft_tokens))  # positions whose π was used
            results.append(VerifyResult(
                seq_id=request.seq_id, num_accepted=accepted,
                emitted=out.tokens[row, : accepted + 1].tolist(),
                deferred=int(deferred[row, :examined].sum()) if request.cascade else 0,
                verify_ms=elapsed, replica=self.replica_name))
        return results

    @staticmethod
    def _draft_probs(requests, drafts, gamma, vocab) -> torch.Tensor:
        """q for every row: processed draft logits, or one-hot drafts for greedy rows sent without."""
        q = torch.zeros(len(requests), gamma, vocab)  # [batch, γ, vocab]
        for row, request in enumerate(requests):
            n = len(request.draft_tokens)
            if request.draft_logits is not None:
                q[row, :n] = sampling.process_logits(request.draft_logits[None].float(),
                                                     [request.sampling])[0]
            else:
                q[row, torch.arange(n), drafts[row, :n]] = 1.0
        return q

    @staticmethod
    def _cascade(requests, p, q, p_logits, gamma, vocab):
        """Replace p by π on the drafted positions of cascade rows. The deferral decision uses
        temperature-1 probabilities (REFERENCE.md §3); the bonus position keeps p."""
        p = p.clone()
        deferred = torch.zeros(len(requests), gamma, dtype=torch.bool)  # [batch, γ]
        rows = [i for i, r in enumerate(requests) if r.cascade is not None and r.draft_tokens]
        if not rows:
            return p, deferred
        q_raw = torch.zeros(len(rows), gamma, vocab)
        for i, row in enumerate(rows):
            n = len(requests[row].draft_tokens)
            q_raw[i, :n] = requests[row].draft_logits.float().softmax(-1)
            q_raw[i, n:] = 1.0 / vocab  # padding positions: any valid distribution
        q_pad = q[rows].clone()
        q_pad[q_pad.sum(-1) == 0] = 1.0 / vocab
        pi, dfr = sampling.cascade_target(p[rows, :gamma], q_pad, p_logits[rows, :gamma].softmax(-1),
                                          q_raw, [requests[row].cascade for row in rows])
        for i, row in enumerate(rows):  # a row's bonus position (index n) keeps p
            n = len(requests[row].draft_tokens)
            p[row, :n] = pi[i, :n]
            deferred[row, :n] = dfr[i, :n]
        return p, deferred
