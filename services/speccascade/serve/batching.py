"""isolated: one engine step's batch, with every request's failure kept to itself."""
from __future__ import annotations

from typing import Any, Callable


def isolated(batch_fn: Callable[[list], list], items: list) -> list:
    """batch_fn over items, returning an exception in place of each item's result that failed.

    A sequence may appear once per forward, so repeated seq_ids go to separate forwards (in
    arrival order). If a forward fails, its items are retried one by one so that one bad request
    (say, a full KV budget for a new sequence) does not fail the requests that shared its batch.
    """
    groups: list[list[int]] = []
    for index, item in enumerate(items):
        group = next((g for g in groups if all(items[i].seq_id != item.seq_id for i in g)), None)
        if group is None:
            groups.append(group := [])
        group.append(index)
    results: list[Any] = [None] * len(items)
    for group in groups:
        batch = [items[i] for i in group]
        try:
            outputs = batch_fn(batch)
        except Exception as error:  # noqa: BLE001 - handed to the caller(s), not raised here
            outputs = [error] if len(batch) == 1 else [_one(batch_fn, item) for item in batch]
        for index, output in zip(group, outputs):
            results[index] = output
    return results


def _one(batch_fn: Callable[[list], list], item) -> Any:
    try:
        return batch_fn([item])[0]
    except Exception as error:  # noqa: BLE001
        return error
