"""Helpers for the stages that run through the real gRPC service (bench/run.py, bench/sweep.py,
bench/frontier.py): sampling fields, the SD-end cascades, losslessness and the replicas' counters.
"""
from __future__ import annotations

from speccascade.sampling import SD_END, DeferralRule

SAMPLED = dict(temperature=0.8, top_p=0.95, seed=1234)


def sd_end_cascades(gamma: int, **fields) -> dict[str, dict]:
    """Every rule at its speculative-decoding end: the same verification as SPECULATIVE."""
    return {f"CASCADE {rule.name} SD end": dict(mode="cascade", deferral_rule=rule.name,
                                                deferral_threshold=SD_END[rule],
                                                num_draft_tokens=gamma, **fields)
            for rule in DeferralRule}


def slowest_sd_end(table: dict[str, dict], reference: str) -> tuple[float, str]:
    """The slowest `sd_end_cascades` configuration of a speed table against `reference`:
    (its tokens/s over the reference's, its name)."""
    ends = {name: s["tokens_per_s"] for name, s in table.items() if name.endswith(" SD end")}
    slowest = min(ends, key=ends.get)
    return ends[slowest] / table[reference]["tokens_per_s"], slowest


def first_divergence(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How many outputs equal the reference token for token, and after how many tokens the rest
    part from it (bf16 logits depend slightly on the batch shape: a near-tie can flip)."""
    parted = []
    for ref, out in zip(reference, other):
        if ref != out:
            parted.append(next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b),
                               min(len(ref), len(out))))
    return {"identical": len(reference) - len(parted), "outputs": len(reference),
            "first_divergence_tokens": sorted(parted)}


def batch_counters(client) -> dict[str, tuple[int, int]]:
    """(batches, batched_calls) summed over the replicas of each role: engine forwards and the
    rows they carried."""
    counters: dict[str, tuple[int, int]] = {}
    for r in client.stats().replicas:
        batches, calls = counters.get(r.role, (0, 0))
        counters[r.role] = (batches + r.batches, calls + r.batched_calls)
    return counters
