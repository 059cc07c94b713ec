"""SlabKVCache: a preallocated K/V cache for many sequences, made for speculative serving.

Layout (gpt-fast's static cache, one slot per sequence; REFERENCE.md §10): per attention layer one
K and one V slab `[slots + 1, kv_heads, slot_len, head_dim]`, zero-initialised. A sequence owns a
slot and a length; a forward writes each row's k new tokens in place at its own positions, and a
rollback is setting the length: rejected drafts stay in the slab past the length, masked, until
they are overwritten. Nothing is concatenated per step, and a batch whose slots are consecutive
(the runner orders rows by slot and reuses low slots first) attends over a view of the slab; only
a batch of scattered slots gathers its rows' attended columns. The extra last slot is a scratch
area where the padding columns of short rows are written.

It plugs into transformers through `AttentionInterface` (model code untouched): the runner calls
`model.set_attn_implementation(ATTN_NAME)` and, around each forward, `begin`/`end`. Every attention
layer then hands its new K/V (after RoPE) to `attend`, which writes them into the slab and attends
over the slab with one mask per forward (one more for each sliding window size), shared by all
layers: boolean, or additive in half precision, where CPU SDPA runs much faster with it. Every layer keeps the whole context, so sliding-window layers (Mistral, Gemma-2/3) roll
back exactly like full ones. Softcapped attention (Gemma-2) takes a matmul path; everything else is
torch SDPA with `enable_gqa=True`, so K/V are never repeated per head group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "speccascade_slab"
_MODULE_ATTR = "_speccascade_kv"


class _Binding:
    """Shared by a model's attention layers: the cache of the forward in progress, if any (two
    runners may wrap one model, as tests do; a model runs one forward at a time)."""
    active: "SlabKVCache | None" = None
    probe: "dict[int, tuple[int, int, torch.dtype]] | None" = None


class UnsupportedModelError(ValueError):
    """The slab cache cannot serve this architecture (raised at load, never mid-request)."""


@dataclass
class _Batch:
    """What one forward needs, computed once and shared by every layer."""
    slots: torch.Tensor          # [batch] slab slot of each row
    rows: slice | None           # the rows as a slab slice when their slots are consecutive
    write_slot: torch.Tensor     # [batch, k] slot each new token is written to (scratch: padding)
    write_pos: torch.Tensor      # [batch, k] its position in the slot
    positions: torch.Tensor      # [batch, k] position of each query (padding: the row's last)
    width: int                   # keys attended: slab columns [0, width)
    masks: dict                  # window (None: full) [, dtype] -> [batch, 1, k, width]
                                 # or None: every key visible


class SlabKVCache:
    def __init__(self, model, *, slots: int, slot_len: int):
        self.slots, self.slot_len = slots, slot_len
        self.device = next(model.parameters()).device
        self._batch: _Batch | None = None
        self._columns = torch.arange(slot_len, device=self.device)
        # Handed to the model as its attention mask: a 4-D mask makes transformers skip building
        # its own (attend ignores it and uses the batch's masks).
        self.model_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self._binding, layers = _attach(model)
        self._binding.probe = seen = {}
        try:
            with torch.inference_mode():
                model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device),
                      use_cache=False)
        finally:
            self._binding.probe = None
        if sorted(seen) != layers:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({model.config.model_type}): its attention layers "
                f"{layers} did not all go through the attention interface (saw {sorted(seen)}); "
                "the slab KV cache cannot serve it")
        self.keys, self.values = {}, {}
        for layer, (heads, dim, dtype) in seen.items():  # [slots + 1, kv_heads, slot_len, dim]
            shape = (slots + 1, heads, slot_len, dim)
            self.keys[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
            self.values[layer] = torch.zeros(shape, dtype=dtype, device=self.device)

    @property
    def bytes(self) -> int:
        slabs = (*self.keys.values(), *self.values.values())
        return sum(t.numel() * t.element_size() for t in slabs)

    # -- one forward -------------------------------------------------------------------------
    def begin(self, slots: list[int], past: list[int], new: list[int]) -> torch.Tensor:
        """Prepare a forward: row b owns `slots[b]`, holds `past[b]` tokens and feeds `new[b]`.
        Returns the position ids. # [batch, k]"""
        dev = self.device
        k = max(new)
        meta = torch.tensor([slots, past, new], device=dev)[:, :, None]  # [3, batch, 1]
        slot_t, past_t, new_t = meta[0], meta[1], meta[2]
        col = self._columns[None, :k]  # [1, k]
        if min(new) == k:  # no padding columns (the usual round)
            positions = past_t + col  # [batch, k]
            write_slot, write_pos = slot_t.expand(-1, k), positions
        else:
            real = col < new_t  # [batch, k]
            positions = past_t + torch.minimum(col, new_t - 1)  # [batch, k]
            write_slot = torch.where(real, slot_t, self.slots)
            write_pos = torch.where(real, past_t + col, col)
        width = max(p + n for p, n in zip(past, new))
        lo = min(slots)
        rows = slice(lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None
        # [batch, 1, k, width]: key j is visible to the query at position t when j <= t. One
        # row of one token sees every key: no mask at all (the single-stream decode step).
        causal = None
        if len(slots) > 1 or k > 1:
            causal = self._columns[None, None, None, :width] <= positions[:, None, :, None]
        self._batch = _Batch(slot_t[:, 0], rows, write_slot, write_pos, positions, width,
                             {None: causal})
        self._binding.active = self
        return positions

    def end(self) -> None:
        self._batch = self._binding.active = None

    def _mask(self, window: int | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The boolean mask of a window size (None: full), or as an additive mask in `dtype`:
        torch's CPU SDPA ran 5x faster in bf16 with an additive mask than with a boolean one
        (and 1.4x slower in fp32), so half-precision layers get one, built once per forward."""
        batch = self._batch
        if window not in batch.masks:
            key_pos = self._columns[None, None, None, : batch.width]
            recent = key_pos > batch.positions[:, None, :, None] - window  # [batch, 1, k, width]
            full = batch.masks[None]
            batch.masks[window] = recent if full is None else full & recent
        if batch.masks[window] is None or dtype is None or dtype in (torch.float32, torch.float64):
            return batch.masks[window]
        if (window, dtype) not in batch.masks:
            visible = batch.masks[window]
            batch.masks[window, dtype] = torch.zeros(visible.shape, dtype=dtype,
                                                     device=self.device).masked_fill_(
                                                         ~visible, float("-inf"))
        return batch.masks[window, dtype]

    def attend(self, layer: int, query, key, value, scaling, window, softcap) -> torch.Tensor:
        """Write this layer's new K/V into the slab, attend over the batch's slots.
        query [batch, heads, k, dim], key/value [batch, kv_heads, k, dim]
        → [batch, k, heads, dim]"""
        batch = self._batch
        keys, values = self.keys[layer], self.values[layer]
        # [batch, k, kv_heads, dim] into the slab at (slot, position)
        keys[batch.write_slot, :, batch.write_pos] = key.transpose(1, 2).to(keys.dtype)
        values[batch.write_slot, :, batch.write_pos] = value.transpose(1, 2).to(values.dtype)
        if batch.rows is not None:  # consecutive slots: a view, no copy
            k_all = keys[batch.rows, :, : batch.width]
            v_all = values[batch.rows, :, : batch.width]
        else:  # scattered slots: gather only the attended columns
            k_all = keys[:, :, : batch.width].index_select(0, batch.slots)
            v_all = values[:, :, : batch.width].index_select(0, batch.slots)
        window = window or None
        if softcap is None:
            mask = self._mask(window, query.dtype)  # [batch, 1, k, width]
            out = F.scaled_dot_product_attention(query, k_all, v_all, attn_mask=mask,
                                                 scale=scaling, enable_gqa=True)
        else:
            out = _softcapped_attention(query, k_all, v_all, self._mask(window), scaling, softcap)
        return out.transpose(1, 2)  # [batch, k, heads, dim]


def _softcapped_attention(query, keys, values, mask, scaling, softcap):
    """Gemma-2's eager attention (tanh-capped scores, fp32 softmax) with grouped heads."""
    b, heads, k, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.view(b, kv_heads, heads // kv_heads, k, dim)  # [batch, kv_heads, group, k, dim]
    scores = q @ keys[:, :, None].transpose(-1, -2) * scaling  # [batch, kv_heads, group, k, width]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return (probs @ values[:, :, None]).view(b, heads, k, dim)


def check_supported(model) -> None:
    """Raise UnsupportedModelError, naming the architecture, unless the slab can serve `model`."""
    config = model.config
    if config.is_encoder_decoder:
        raise UnsupportedModelError(f"{config.model_type}: encoder-decoder models are not served")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({config.model_type}) does not route attention through "
            "transformers' AttentionInterface; the slab KV cache cannot serve it")
    if getattr(config, "max_position_embeddings", None) is None:
        raise UnsupportedModelError(f"{type(model).__name__} ({config.model_type}) states no "
                                    "context length; the slab KV cache cannot serve it")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise UnsupportedModelError(f"{config.model_type} has layers of kinds {sorted(kinds)}; "
                                    "only full and sliding-window attention are served")


def _attach(model) -> tuple[_Binding, list[int]]:
    """Give every attention layer the model's binding; it and the sorted layer indices."""
    check_supported(model)
    config = model.config
    binding = getattr(model, _MODULE_ATTR, None) or _Binding()
    setattr(model, _MODULE_ATTR, binding)
    layers = []
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx"):
            setattr(module, _MODULE_ATTR, binding)
            layers.append(module.layer_idx)
    if not layers:
        raise UnsupportedModelError(f"{config.model_type}: no attention layers found")
    model.set_attn_implementation(ATTN_NAME)
    return binding, sorted(layers)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               sliding_window=None, softcap=None, **kwargs):
    binding: _Binding | None = getattr(module, _MODULE_ATTR, None)
    if binding is not None and binding.active is not None:
        return binding.active.attend(module.layer_idx, query, key, value, scaling,
                                     sliding_window, softcap), None
    if binding is not None and binding.probe is not None:  # the load-time probe: record shapes
        binding.probe[module.layer_idx] = (key.shape[1], key.shape[3], key.dtype)
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, is_causal=True,
                                             enable_gqa=True)
        return out.transpose(1, 2), None
    # Outside the runner (model.generate or a plain forward on the same object, as the benchmark's
    # peers run): stock SDPA with stock masks, which the mask registration below builds.
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                                  **kwargs)


AttentionInterface.register(ATTN_NAME, _attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
