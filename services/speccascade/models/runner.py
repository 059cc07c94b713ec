"""ModelRunner: one causal LM and the KV caches of many sequences, in one preallocated slab.

Each live sequence owns a slot of a `SlabKVCache` (models.kvcache) holding exactly the tokens in
`_Entry.tokens`. A call names, per sequence, the whole token sequence it wants continued and how
many trailing positions it wants logits for; the runner reconciles the cache with that sequence
(longest common prefix → set the length, no recomputation), feeds only the missing tokens, and
returns the logits. Rejected drafts, pipelined speculation and a fail-over to a fresh replica are
therefore all the same operation.

Several sequences share one forward: each row writes its new tokens into its own slot at its own
positions, padding columns go to a scratch slot, and one mask hides everything past each row's
length, so the result equals one-at-a-time forwards (tested). Nothing is copied per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from speccascade.models.kvcache import SlabKVCache, check_supported


class CapacityError(RuntimeError):
    """The KV budget of this replica (its slots) is full."""


class ContextLengthError(ValueError):
    field = "max_new_tokens"


@dataclass
class _Entry:
    slot: int
    tokens: list[int] = field(default_factory=list)  # the slot holds K/V for exactly these
    last_used: float = field(default_factory=time.monotonic)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, checked at C speed
        return n
    lo, hi = 0, n  # binary search on prefix equality: O(n log n) worst case, rare
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# A KV slot's length when the caller names none: the model's context, capped here. SmolLM2
# declares 8192 positions; 64 slots of 8192 would preallocate 24 GB of fp32 K/V for it. Pass
# max_seq_len for more (up to the model's max_position_embeddings).
DEFAULT_MAX_SEQ_LEN = 2048


class ModelRunner:
    """`kv_cache_tokens` is the replica's KV budget in tokens (None: max_live_seqs × context);
    it is cut into slots of `max_seq_len` tokens (None: the model's context, at most
    DEFAULT_MAX_SEQ_LEN), one per live sequence, all allocated here."""

    def __init__(self, model, *, max_live_seqs: int = 64, max_seq_len: int | None = None,
                 idle_evict_s: float = 600.0, kv_cache_tokens: int | None = None):
        check_supported(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN,
                               model.config.max_position_embeddings)
        budget = kv_cache_tokens or max_live_seqs * self.max_seq_len
        self.max_live_seqs = min(max_live_seqs, budget // self.max_seq_len)
        self.last_forward_tokens = 0
        if self.max_live_seqs < 1:
            raise ValueError(f"kv_cache_tokens={budget} cannot hold one sequence of the model "
                             f"context ({self.max_seq_len} tokens)")
        self._budget_note = (f"max_live_seqs={max_live_seqs}, kv_cache_tokens={budget}, "
                             f"{self.max_seq_len} tokens per slot")
        self.idle_evict_s = idle_evict_s  # entries of vanished callers are reclaimed after this
        self.pad_id = model.config.pad_token_id or 0
        self.cache = SlabKVCache(model, slots=self.max_live_seqs, slot_len=self.max_seq_len)
        self._free = list(range(self.max_live_seqs - 1, -1, -1))  # a stack: lowest slot on top
        self._entries: dict[str, _Entry] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def live_sequences(self) -> int:
        return len(self._entries)

    def kv_tokens(self) -> tuple[int, int]:
        """(tokens cached, token capacity) of this replica's KV slab."""
        return (sum(len(e.tokens) for e in self._entries.values()),
                self.max_live_seqs * self.max_seq_len)

    def cached_tokens(self, seq_id: str) -> list[int]:
        entry = self._entries.get(seq_id)
        return list(entry.tokens) if entry else []

    def release(self, seq_id: str) -> None:
        entry = self._entries.pop(seq_id, None)
        if entry is not None:
            self._free.append(entry.slot)
            self._free.sort(reverse=True)  # reuse low slots: batches tend to be consecutive slots

    def rollback(self, seq_id: str, length: int) -> None:
        """Forget every cached token at index >= length: only the length changes."""
        entry = self._entries.get(seq_id)
        if entry is not None and length < len(entry.tokens):
            del entry.tokens[length:]

    def _entry(self, seq_id: str) -> _Entry:
        entry = self._entries.get(seq_id)
        if entry is None:
            if not self._free:
                self.evict_idle()
            if not self._free:
                raise CapacityError(f"replica holds {len(self._entries)} live sequences, its KV "
                                    f"budget ({self._budget_note}) is full")
            entry = self._entries[seq_id] = _Entry(slot=self._free.pop())
        entry.last_used = time.monotonic()
        return entry

    def idle_seconds(self) -> dict[str, float]:
        """seq_id -> seconds since its last forward, for every live sequence (session leases)."""
        now = time.monotonic()
        return {seq_id: now - e.last_used for seq_id, e in self._entries.items()}

    def evict_idle(self) -> None:
        """Drop entries unused for idle_evict_s: callers that vanished without a release."""
        cutoff = time.monotonic() - self.idle_evict_s
        for seq_id in [s for s, e in self._entries.items() if e.last_used < cutoff]:
            self.release(seq_id)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, items: list[tuple[str, list[int], int]]) -> list[torch.Tensor]:
        """items: (seq_id, tokens, num_logits) with distinct seq_ids.

        Returns, per item, the logits predicting the token after each of the last num_logits
        tokens. # [num_logits, vocab]
        """
        logits = self.forward_batch(items)
        return [logits[row, :n] for row, (_, _, n) in enumerate(items)]

    @torch.inference_mode()
    def forward_batch(self, items: list[tuple[str, list[int], int]]) -> torch.Tensor:
        """As `forward`, as one tensor: row b's logits are [b, :num_logits_b], the rest padding
        (copies of its last row). # [batch, max num_logits, vocab] float32"""
        if len({seq_id for seq_id, _, _ in items}) != len(items):
            raise ValueError("a sequence may appear only once per forward")
        entries, new_tokens = [], []
        for seq_id, tokens, num_logits in items:
            if len(tokens) > self.max_seq_len:
                raise ContextLengthError(f"sequence of {len(tokens)} tokens exceeds the model "
                                         f"context of {self.max_seq_len} tokens")
            if not 1 <= num_logits <= len(tokens):
                raise ValueError(f"num_logits={num_logits} must be in [1, {len(tokens)}]")
            entry = self._entry(seq_id)
            keep = min(_common_prefix(entry.tokens, tokens), len(tokens) - num_logits)
            del entry.tokens[keep:]
            entries.append(entry)
            new_tokens.append(tokens[keep:])
        wanted = [n for _, _, n in items]
        # Rows in slot order: a batch of consecutive slots then attends over a slab slice (a view)
        # whatever order its calls arrived in. The logits come back in the callers' order.
        order = sorted(range(len(items)), key=lambda i: entries[i].slot)
        if order != list(range(len(items))):
            entries, new_tokens, wanted = ([xs[i] for i in order]
                                           for xs in (entries, new_tokens, wanted))
            logits = self._forward_rows(entries, new_tokens, wanted)
            inverse = torch.tensor(order, device=self.device).argsort()
            return logits.index_select(0, inverse)
        return self._forward_rows(entries, new_tokens, wanted)

    def _forward_rows(self, entries: list[_Entry], new_tokens: list[list[int]],
                      wanted: list[int]) -> torch.Tensor:
        lengths = [len(new) for new in new_tokens]
        k = max(lengths)
        self.last_forward_tokens = len(entries) * k  # positions computed, padding included (costs)
        ids = torch.tensor([new + [self.pad_id] * (k - len(new)) for new in new_tokens],
                           device=self.device)  # [batch, k], right-padded
        positions = self.cache.begin([e.slot for e in entries], [len(e.tokens) for e in entries],
                                     lengths)
        # Rows are right-padded, so the wanted logits end at a different column per row: project
        # only the columns from the earliest one any row wants (a prefill needs one row, not k
        # rows of the vocab projection, which alone costs tens of ms for a long prompt on a CPU).
        first = min(n_new - n for n_new, n in zip(lengths, wanted))
        try:
            out = self.model(input_ids=ids, position_ids=positions, use_cache=False,
                             attention_mask=self.cache.model_mask, logits_to_keep=k - first)
        finally:
            self.cache.end()
        for entry, new in zip(entries, new_tokens):
            entry.tokens.extend(new)
        logits = out.logits  # [batch, k - first, vocab]; column j is new-token column first + j
        if all(n_new == k for n_new in lengths) and all(n == wanted[0] for n in wanted):
            return logits.float()  # the usual round: every row wants all the columns kept
        # Left-align each row's wanted columns; pad with copies of its last one.
        bounds = torch.tensor([(n_new - n - first, n_new - first - 1)
                               for n_new, n in zip(lengths, wanted)], device=self.device)
        span = torch.arange(max(wanted), device=self.device)  # [m]
        index = torch.minimum(bounds[:, :1] + span, bounds[:, 1:])  # [batch, m]
        return logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1])).float()
