"""A reduced-vocabulary draft head (FR-Spec, Zhao et al. 2025; VocabTrim, 2025).

A draft's step on a real vocabulary is dominated by its LM head: 49 152 × d MACs a token, more
than all its layers. The head is therefore cut to the N most frequent tokens of the target's own
outputs (frequency-ranked, so any prefix of the ranking is a smaller valid head). Logits come back
over the whole vocabulary, with FILL everywhere else: after a softmax q is exactly zero there, so
the draft never proposes those tokens, and speculative verification stays exact for any q
(REFERENCE.md §2). Nothing downstream (runner, sampler, cascade rules) knows the head is cut.

Terms: V the vocabulary, N the kept tokens (`token_ids`, frequency-ranked), d the hidden size.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HEAD_IDS_FILE = "head_token_ids.json"  # beside a draft's config.json: the ranking, most frequent first
# exp(FILL − max logit) underflows to exactly 0 in float32 at any sane temperature, and unlike −inf
# it keeps log q finite (q·log q = 0, not NaN) for the cascade rules' entropies and KLs.
FILL = -1e4


class ReducedVocabHead(torch.nn.Module):
    """weight: [N, d] (rows of the full head), token_ids: [N]; forward: [..., d] → [..., V]."""

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("token_ids", token_ids.to(torch.long), persistent=False)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = hidden @ self.weight.T  # [..., N]
        out = kept.new_full((*kept.shape[:-1], self.vocab_size), FILL)  # [..., V]
        return out.index_copy_(-1, self.token_ids, kept)

    def extra_repr(self) -> str:
        return f"kept={len(self.token_ids)}, vocab={self.vocab_size}"


def reduce_head(model, token_ids: list[int]) -> None:
    """Replace model.lm_head (tied or not) by the rows of `token_ids`. Untie first: the input
    embedding keeps every token, since the draft must read whatever the target accepted."""
    full = model.get_output_embeddings().weight  # [V, d]
    ids = torch.tensor(token_ids, dtype=torch.long, device=full.device)
    model.config.tie_word_embeddings = False
    model.lm_head = ReducedVocabHead(full[ids], ids, full.shape[0])


def head_token_ids(checkpoint: Path) -> list[int] | None:
    """The frequency ranking a draft checkpoint ships, cut to its config's `draft_head_size`
    (None: the checkpoint has a full head)."""
    path = Path(checkpoint) / HEAD_IDS_FILE
    if not path.is_file():
        return None
    ranking = json.loads(path.read_text())
    size = json.loads((Path(checkpoint) / "config.json").read_text()).get("draft_head_size")
    return ranking[:size] if size else ranking


def frequency_ranking(sequences, vocab_size: int, always: tuple[int, ...] = ()) -> list[int]:
    """Every token id, most frequent in `sequences` first (ties: lower id first), with `always`
    (end-of-turn and end-of-text tokens) at the top so any prefix can still end an answer."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(torch.as_tensor(seq, dtype=torch.long), minlength=vocab_size)
    counts[list(always)] = counts.max() + 1
    # A stable sort on −count keeps ties in id order on every machine.
    return torch.sort(-counts, stable=True).indices.tolist()
