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
from speccascade.engine.costs import CostMeter
from speccascade.engine.seam import (DraftRequest, DraftResult, SparseDraft, VerifyRequest,
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
        self.costs = CostMeter()  # this replica's forward costs and load, for the controller
        self._calibrate()

    # Calibration calls (forwards of `rows` rows × `tokens` new tokens, `steps` in a row) timed at
    # start to seed the cost fit: shapes a round uses, varied enough to separate the terms.
    CALIBRATION: tuple[tuple[int, int, int], ...] = ()   # (rows, tokens, steps)
    CALIBRATION_CONTEXT = 32

    def _calibrate(self) -> None:
        vocab = self.runner.model.config.vocab_size
        for rows, tokens, steps in self.CALIBRATION:
            rows = min(rows, self.runner.max_live_seqs)
            ids = [f"__calibration-{r}" for r in range(rows)]
            seqs = {i: [(7 * t + r) % vocab for t in range(self.CALIBRATION_CONTEXT)]
                    for r, i in enumerate(ids)}
            try:
                best = float("inf")
                for _ in range(2):  # the faster of two: the first may pay for warm-up
                    for i in ids:
                        self.runner.release(i)
                    self.runner.forward_batch([(i, seqs[i], 1) for i in ids]).sum().item()
                    started = time.perf_counter()
                    grown = {i: list(seqs[i]) for i in ids}
                    computed = 0
                    for step in range(steps):
                        for i in ids:
                            grown[i] += [(grown[i][-1] + 1 + k) % vocab for k in range(tokens)]
                        self.runner.forward_batch([(i, grown[i], tokens) for i in ids]).sum().item()
                        computed += self.runner.last_forward_tokens
                    best = min(best, (time.perf_counter() - started) * 1000)
                self.costs.add_prior(self._features(rows, steps, computed), best)
            finally:
                for i in ids:
                    self.runner.release(i)

    @staticmethod
    def _features(rows: int, steps: int, computed: int) -> tuple[float, float, float]:
        raise NotImplementedError

    def live_sequences(self) -> int:
        return self.runner.live_sequences()

    def release(self, seq_id: str) -> None:
        self.runner.release(seq_id)
        self.costs.released(seq_id)


class DraftWorker(_Worker):
    CALIBRATION = ((1, 1, 1), (1, 1, 4), (2, 1, 4))

    @staticmethod
    def _features(rows, steps, computed):
        return (1.0, steps, computed)

    def draft_batch(self, requests: list[DraftRequest]) -> list[DraftResult]:
        """γ single-token steps, all sequences of the batch in each step."""
        started = time.perf_counter()
        sequences = {r.seq_id: list(r.tokens) for r in requests}
        drafted: dict[str, list[int]] = {r.seq_id: [] for r in requests}
        shipped: dict[str, list[tuple]] = {r.seq_id: [] for r in requests}
        active = list(requests)
        step = computed = 0
        while active:
            logits = self.runner.forward_batch(
                [(r.seq_id, sequences[r.seq_id], 1) for r in active])  # [batch, 1, vocab]
            computed += self.runner.last_forward_tokens
            tokens, q_rows = self._sample(logits, active, step)  # [batch], per row q′ or None
            still_active = []
            for row, request in enumerate(active):
                unsure = (request.stop_below > 0 and step > 0
                          and logits[row, 0].softmax(-1).max().item() < request.stop_below)
                if unsure:  # the draft doubts this token: stop here rather than waste a verify slot
                    continue
                token = int(tokens[row])
                drafted[request.seq_id].append(token)
                sequences[request.seq_id].append(token)
                if q_rows[row] is not None:
                    shipped[request.seq_id].append(q_rows[row])
                if len(drafted[request.seq_id]) < request.num_draft_tokens:
                    still_active.append(request)
            active = still_active
            step += 1
        ended = time.perf_counter()
        elapsed = (ended - started) * 1000
        self.costs.observe(self._features(len(requests), step, computed), elapsed, len(requests),
                           [r.seq_id for r in requests], started, ended)
        cost = self.costs.report()
        return [DraftResult(
            seq_id=r.seq_id, tokens=drafted[r.seq_id],
            q=self._stack(shipped[r.seq_id]) if shipped[r.seq_id] else None,
            draft_ms=elapsed, replica=self.replica_name, cost=cost) for r in requests]

    @staticmethod
    def _sample(logits: torch.Tensor, requests: list[DraftRequest], step: int):
        """One draft step: tokens [batch] and, per row, the q′ it was sampled from as
        (indices [k], probs [k], raw [k] | None), or None for a row that ships nothing.

        Sampled rows draw from q′ = top-`ship_top_k` of their processed q (the full q when they
        ship nothing); greedy rows take the argmax, which q′ always contains."""
        q = sampling.process_logits(logits, [r.sampling for r in requests])[:, 0]  # [batch, vocab]
        vocab = q.shape[-1]
        k_rows = torch.tensor([r.ship_top_k or (0 if r.sampling.greedy else vocab)
                               for r in requests])  # [batch]; 0 = greedy, ships nothing
        greedy = torch.tensor([r.sampling.greedy for r in requests])  # [batch]
        tokens = q.argmax(-1)  # [batch]
        if int(k_rows.max()) == 0:
            return tokens, [None] * len(requests)
        indices, top = sampling.truncate_top_k(q, int(k_rows.max()))  # [batch, kmax]
        # Rows with a smaller k keep the head of the sorted top-kmax, renormalized.
        keep = torch.arange(indices.shape[1])[None, :] < k_rows[:, None]  # [batch, kmax]
        probs = top * keep
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        sampled = (~greedy).nonzero().squeeze(1).tolist()
        if sampled:
            generators = [sampling.round_generator(requests[i].sampling.seed,
                                                   requests[i].position + step,
                                                   sampling.DRAFT_STREAM) for i in sampled]
            tokens[sampled] = sampling.sample_sparse(indices[sampled], probs[sampled], generators)
        raw = None
        if any(r.ship_raw for r in requests):  # temperature-1 q at the same indices
            raw = logits[:, 0].float().softmax(-1).gather(-1, indices.long())  # [batch, kmax]
        rows = []
        for i, r in enumerate(requests):
            k = r.ship_top_k
            rows.append(None if k == 0 else (indices[i, :k], probs[i, :k],
                                             raw[i, :k] if r.ship_raw else None))
        return tokens, rows

    @staticmethod
    def _stack(rows: list[tuple]) -> SparseDraft:
        indices, probs, raw = zip(*rows)
        return SparseDraft(torch.stack(indices), torch.stack(probs),  # [len, k]
                           None if raw[0] is None else torch.stack(raw))


class VerifyWorker(_Worker):
    CALIBRATION = ((1, 1, 1), (1, 5, 1), (2, 5, 1), (1, 9, 1))

    @staticmethod
    def _features(rows, steps, computed):
        return (1.0, rows, computed)

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
        if all(r.sampling.greedy for r in requests):
            best = p_logits.argmax(-1)  # [batch, γ+1]
            if gamma and any(r.cascade is not None for r in requests):
                deferred = self._greedy_cascade(requests, best, p_logits, drafts, num_drafts)
            out = sampling.verify_greedy_tokens(drafts, num_drafts, best)
        else:
            p = sampling.process_logits(p_logits, params)  # [batch, γ+1, vocab]
            p = sampling.truncate_target(p, params)  # p̃ for min-p / η rows (not cascades)
            q = self._draft_probs(requests, drafts, gamma, vocab)  # [batch, γ, vocab]
            if gamma and any(r.cascade is not None for r in requests):
                p, deferred = self._cascade(requests, p, q, p_logits, gamma, vocab)
            generators = [sampling.round_generator(r.sampling.seed, len(r.tokens),
                                                   sampling.VERIFY_STREAM) for r in requests]
            lenience = None  # lossy speculative decoding where a row asks for it
            if any(s.lenience != 1 for s in params):
                lenience = torch.tensor([s.lenience for s in params], dtype=torch.float64)
            out = sampling.verify(drafts, num_drafts, q, p, generators, lenience)
        ended = time.perf_counter()
        elapsed = (ended - started) * 1000
        self.costs.observe(self._features(batch, 1, self.runner.last_forward_tokens), elapsed, batch,
                           [r.seq_id for r in requests], started, ended)
        cost = self.costs.report()
        results = []
        for row, request in enumerate(requests):
            accepted = int(out.num_accepted[row])
            examined = min(accepted + 1, len(request.draft_tokens))  # positions whose π was used
            results.append(VerifyResult(
                seq_id=request.seq_id, num_accepted=accepted,
                emitted=out.tokens[row, : accepted + 1].tolist(),
                deferred=int(deferred[row, :examined].sum()) if request.cascade else 0,
                verify_ms=elapsed, replica=self.replica_name, cost=cost))
        return results

    @staticmethod
    def _sparse_batch(requests, drafts, gamma, field: str):
        """The rows' shipped q′ (field "probs") or raw q ("raw") padded into (indices, values)
        [batch, γ, kmax]. Rows that shipped nothing (greedy) get q′ = 1 at the drafted token."""
        kmax = max([1] + [r.draft_q.indices.shape[1] for r in requests if r.draft_q is not None])
        batch = len(requests)
        indices = torch.zeros(batch, gamma, kmax, dtype=torch.long)  # [batch, γ, kmax]
        values = torch.zeros(batch, gamma, kmax)  # [batch, γ, kmax]; padding adds 0
        indices[:, :, 0] = drafts
        num_drafts = torch.tensor([len(r.draft_tokens) for r in requests])
        values[:, :, 0] = (torch.arange(gamma)[None, :] < num_drafts[:, None]).float()
        for row, request in enumerate(requests):  # copy the payloads in; the math is batched
            sparse = request.draft_q
            if sparse is not None:
                n, k = sparse.indices.shape
                indices[row, :n, :k] = sparse.indices
                values[row, :n, :k] = getattr(sparse, field)  # k ≥ 1: replaces the one-hot
        return indices, values

    @classmethod
    def _draft_probs(cls, requests, drafts, gamma, vocab) -> torch.Tensor:
        """q′ for every row [batch, γ, vocab]: exactly what its drafter sampled from."""
        return sampling.sparse_to_dense(*cls._sparse_batch(requests, drafts, gamma, "probs"), vocab)

    @staticmethod
    def _greedy_cascade(requests, best, p_logits, drafts, num_drafts):
        """Greedy cascade rows: best[row, :γ] becomes the token of π (in place), without the dense
        p, q and π of `_cascade` (sampling.cascade_greedy_tokens). Returns deferred [batch, γ]."""
        gamma = drafts.shape[1]
        deferred = torch.zeros(len(requests), gamma, dtype=torch.bool)  # [batch, γ]
        rows = [i for i, r in enumerate(requests) if r.cascade is not None and r.draft_tokens]
        if not rows:
            return deferred
        chosen = [requests[i] for i in rows]
        if any(r.draft_q is None or r.draft_q.raw is None for r in chosen):
            raise ValueError("cascade verification needs the draft's q′ with raw probabilities")
        q_raw = torch.ones(len(rows), gamma)  # [rows, γ]; undrafted positions are never read
        for row, r in enumerate(chosen):
            q_raw[row, :len(r.draft_tokens)] = r.draft_q.raw[:, 0]  # q(d) = max q: d is q's argmax
        tokens, dfr = sampling.cascade_greedy_tokens(
            drafts[rows], p_logits[rows, :gamma].softmax(-1), q_raw, [r.cascade for r in chosen])
        drafted = torch.arange(gamma)[None, :] < num_drafts[rows][:, None]  # [rows, γ]
        # A row's bonus position (index n) keeps argmax p: π only on drafted positions.
        best[rows, :gamma] = torch.where(drafted, tokens, best[rows, :gamma])
        deferred[rows] = dfr & drafted
        return deferred

    @classmethod
    def _cascade(cls, requests, p, q, p_logits, gamma, vocab):
        """Replace p by π on the drafted positions of cascade rows. The deferral decision uses
        temperature-1 probabilities (REFERENCE.md §3); the bonus position keeps p.

        The draft side of every rule needs temperature-1 q only on q′'s support: max q (the
        argmax is always in q′) and, for Token-V1, q(v) where q′(v) > 0 (π keeps q′(v)·1[v ∈ A]),
        so the shipped `raw` at q′'s indices is the whole of what the rules read."""
        p = p.clone()
        deferred = torch.zeros(len(requests), gamma, dtype=torch.bool)  # [batch, γ]
        rows = [i for i, r in enumerate(requests) if r.cascade is not None and r.draft_tokens]
        if not rows:
            return p, deferred
        chosen = [requests[i] for i in rows]
        if any(r.draft_q is None or r.draft_q.raw is None for r in chosen):
            raise ValueError("cascade verification needs the draft's q′ with raw probabilities")
        indices, raw = cls._sparse_batch(chosen, torch.zeros(len(rows), gamma, dtype=torch.long),
                                         gamma, "raw")
        q_raw = sampling.sparse_to_dense(indices, raw, vocab)  # [rows, γ, vocab]
        q_pad = q[rows].clone()
        empty = q_pad.sum(-1) == 0  # padding positions: any valid distribution
        q_pad[empty] = 1.0 / vocab
        q_raw[empty] = 1.0 / vocab
        pi, dfr = sampling.cascade_target(p[rows, :gamma], q_pad, p_logits[rows, :gamma].softmax(-1),
                                          q_raw, [r.cascade for r in chosen])
        # A row's bonus position (index n) keeps p: π only on drafted positions.
        drafted = ~empty  # [rows, γ]
        p[rows, :gamma] = torch.where(drafted[..., None], pi, p[rows, :gamma])
        deferred[rows] = dfr & drafted
        return p, deferred
