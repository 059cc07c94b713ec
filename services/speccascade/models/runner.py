"""ModelRunner: one causal LM and the KV caches of many sequences.

Each live sequence keeps its own transformers `DynamicCache` holding exactly the tokens in
`_Entry.tokens`. A call names, per sequence, the whole token sequence it wants continued and how
many trailing positions it wants logits for; the runner reconciles the cache with that sequence
(longest common prefix → crop, no recomputation), feeds only the missing tokens, and returns the
logits. Rejected drafts, pipelined speculation and a fail-over to a fresh replica are therefore all
the same operation.

Several sequences share one forward: their caches are left-padded to a common length and stacked
into a temporary batched cache; padding is masked out, and position ids are per sequence, so the
result equals one-at-a-time forwards (tested). Afterwards each sequence keeps a view of its rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


class CapacityError(RuntimeError):
    """The live-sequence budget (the KV memory budget) of this replica is full."""


class ContextLengthError(ValueError):
    field = "max_new_tokens"


@dataclass
class _Entry:
    tokens: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None   # holds K/V for exactly `tokens`
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


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class ModelRunner:
    def __init__(self, model, *, max_live_seqs: int = 64, max_seq_len: int | None = None,
                 idle_evict_s: float = 600.0):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_live_seqs = max_live_seqs
        self.max_seq_len = max_seq_len or model.config.max_position_embeddings
        self.idle_evict_s = idle_evict_s  # entries of callers that vanished are reclaimed after this
        self.pad_id = model.config.pad_token_id or 0
        self._entries: dict[str, _Entry] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def live_sequences(self) -> int:
        return len(self._entries)

    def cached_tokens(self, seq_id: str) -> list[int]:
        entry = self._entries.get(seq_id)
        return list(entry.tokens) if entry else []

    def release(self, seq_id: str) -> None:
        self._entries.pop(seq_id, None)

    def rollback(self, seq_id: str, length: int) -> None:
        """Forget every cached token at index >= length (a view: no copy, no recomputation)."""
        entry = self._entries.get(seq_id)
        if entry is None or length >= len(entry.tokens):
            return
        removed = len(entry.tokens) - length
        entry.tokens = entry.tokens[:length]
        if length == 0:
            entry.cache = None
        else:
            entry.cache.crop(-removed)  # transformers 5: a negative count removes trailing tokens

    def _entry(self, seq_id: str) -> _Entry:
        entry = self._entries.get(seq_id)
        if entry is None:
            if len(self._entries) >= self.max_live_seqs:
                self.evict_idle()
            if len(self._entries) >= self.max_live_seqs:
                raise CapacityError(f"replica holds {len(self._entries)} live sequences, its "
                                    f"budget (max_live_seqs={self.max_live_seqs}) is full")
            entry = self._entries[seq_id] = _Entry()
        entry.last_used = time.monotonic()
        return entry

    def evict_idle(self) -> None:
        """Drop entries unused for idle_evict_s: callers that vanished without a release."""
        cutoff = time.monotonic() - self.idle_evict_s
        for seq_id in [s for s, e in self._entries.items() if e.last_used < cutoff]:
            del self._entries[seq_id]

    # -- forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, items: list[tuple[str, list[int], int]]) -> list[torch.Tensor]:
        """items: (seq_id, tokens, num_logits) with distinct seq_ids.

        Returns, per item, the logits predicting the token after each of the last num_logits
        tokens. # [num_logits, vocab]
        """
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
            self.rollback(seq_id, keep)
            entries.append(entry)
            new_tokens.append(tokens[keep:])
        wanted = [n for _, _, n in items]
        if len(items) == 1:
            logits = [self._forward_one(entries[0], new_tokens[0], wanted[0])]
        else:
            logits = self._forward_batch(entries, new_tokens, wanted)
        for entry, new in zip(entries, new_tokens):
            entry.tokens.extend(new)
        return logits

    def _forward_one(self, entry: _Entry, new: list[int], wanted: int) -> torch.Tensor:
        cache = entry.cache if entry.cache is not None else DynamicCache(config=self.model.config)
        past = len(entry.tokens)
        ids = torch.tensor([new], device=self.device)  # [1, k]
        positions = torch.arange(past, past + len(new), device=self.device)[None]  # [1, k]
        # logits_to_keep: a prefill needs one row, not k rows of the vocab projection (the
        # projection of a 400-token prompt onto 8192 logits alone costs tens of ms on a CPU).
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=wanted)
        entry.cache = out.past_key_values
        return out.logits[0].float()  # [wanted, vocab]

    def _forward_batch(self, entries: list[_Entry], new_tokens: list[list[int]],
                       wanted: list[int]) -> list[torch.Tensor]:
        batch = len(entries)
        past = [len(e.tokens) for e in entries]
        width, k = max(past), max(len(n) for n in new_tokens)
        # [batch, width + k]: 1 on real cached and new tokens; left padding before the cache,
        # right padding after short new-token runs.
        mask = torch.zeros(batch, width + k, dtype=torch.long, device=self.device)
        ids = torch.full((batch, k), self.pad_id, dtype=torch.long, device=self.device)
        positions = torch.zeros(batch, k, dtype=torch.long, device=self.device)
        for row, (p, new) in enumerate(zip(past, new_tokens)):
            mask[row, width - p: width + len(new)] = 1
            ids[row, : len(new)] = torch.tensor(new, device=self.device)
            positions[row] = torch.arange(p, p + k, device=self.device)
        cache = DynamicCache(config=self.model.config)
        if width > 0:
            cache = DynamicCache(ddp_cache_data=self._stack_caches(entries, past, width),
                                 config=self.model.config)
        # Rows are right-padded, so the wanted logits end at a different column per row: keep
        # the columns from the earliest one any row wants.
        first = min(len(new) - n for new, n in zip(new_tokens, wanted))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=k - first)
        layers = _layers(out.past_key_values)
        for row, (entry, p, new) in enumerate(zip(entries, past, new_tokens)):
            span = slice(width - p, width + len(new))
            entry.cache = DynamicCache(
                ddp_cache_data=[(key[row: row + 1, :, span], val[row: row + 1, :, span])
                                for key, val in layers], config=self.model.config)
        # out.logits column j is new-token column first + j.  # [batch, k - first, vocab]
        return [out.logits[row, len(new) - n - first: len(new) - first].float()
                for row, (new, n) in enumerate(zip(new_tokens, wanted))]

    def _stack_caches(self, entries, past, width):
        """Left-pad every sequence's K/V to `width` and stack. # per layer [batch, heads, width, dim]"""
        reference = next(e.cache for e in entries if e.cache is not None)
        stacked = []
        for layer, (ref_key, _) in enumerate(_layers(reference)):
            shape = (len(entries), ref_key.shape[1], width, ref_key.shape[3])
            keys = ref_key.new_zeros(shape)
            values = ref_key.new_zeros(shape)
            for row, (entry, p) in enumerate(zip(entries, past)):
                if p:
                    key, value = entry.cache.layers[layer].keys, entry.cache.layers[layer].values
                    keys[row, :, width - p:] = key[0]
                    values[row, :, width - p:] = value[0]
            stacked.append((keys, values))
        return stacked
