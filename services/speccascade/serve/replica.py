"""What the drafter and verifier replicas share: model loading, one forward thread, batch isolation.

A replica's worker (engine.workers) is not thread-safe, so every operation on it — batched
forwards and releases alike — runs on one dedicated thread. The event loop stays free meanwhile,
so calls arriving during a forward queue up in `@serve.batch` and share the next forward.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from speccascade.serve.config import DeploymentSpec, ServiceConfig
from speccascade.serve.metrics import ReplicaMetrics


def serve_replica_name(default: str) -> str:
    """The Serve actor name of this replica ("SERVE_REPLICA::app#Deployment#id"), which
    `ray.get_actor(name, namespace="serve")` finds; `default` when running outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # noqa: BLE001 - not inside a Serve replica (plain use, unit tests)
        return default


def world_size() -> int:
    try:
        from ray import serve

        return serve.get_replica_context().world_size
    except Exception:  # noqa: BLE001
        return 1


def _isolated(batch_fn: Callable[[list], list], items: list) -> list:
    """batch_fn over items, returning an exception in place of each item's result that failed.

    A sequence may appear once per forward, so repeated seq_ids go to separate forwards. If a
    forward fails, its items are retried one by one so that one bad request (say, a full KV budget
    for a new sequence) does not fail the requests that happened to share its batch.
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


class ModelReplica:
    """Base of Drafter and Verifier. Subclasses set `role` and build `self.worker`."""

    role = ""

    def __init__(self, config: ServiceConfig | dict, spec: DeploymentSpec):
        self.config = ServiceConfig.load(config)
        torch.set_num_threads(spec.torch_threads)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-forward")
        self._metrics = ReplicaMetrics(self.role)
        self._batches = self._batched_calls = 0
        self._reaper: asyncio.Task | None = None

    def _name_worker(self) -> None:
        self.worker.replica_name = serve_replica_name(self.worker.replica_name)

    def _start_reaper(self) -> None:
        """Started by the first call (the constructor runs outside the replica's event loop)."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        # Entries of a router that died mid-request get no release call; without this they would
        # hold the KV budget until it fills (eviction at capacity is the other trigger).
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.kv_idle_evict_s / 2)
            # The same eviction the runner runs when its budget is full.
            await loop.run_in_executor(self._thread, self.worker.runner.evict_idle)
            self._report_kv()

    def _configure_batching(self, batch_method, spec: DeploymentSpec) -> None:
        batch_method.set_max_batch_size(spec.max_batch_size)
        batch_method.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    async def _run_batch(self, batch_fn: Callable[[list], list], items: list) -> list:
        self._start_reaper()
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._thread, _isolated, batch_fn, items)
        self._batches += 1
        self._batched_calls += len(items)
        self._report_kv()
        return results

    def _report_kv(self) -> None:
        self._metrics.set_live(self.worker.live_sequences(), *self.worker.runner.kv_tokens())

    async def release(self, seq_id: str) -> None:
        """Drop a sequence's KV entry (on the forward thread: never during a forward)."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self.worker.release, seq_id)
        self._report_kv()

    async def stats(self) -> dict[str, Any]:
        self._start_reaper()
        runner = self.worker.runner
        used, total = runner.kv_tokens()
        cost = self.worker.costs.report()
        return {"cost_coefficients": list(cost.coef), "mean_batch_rows": cost.rows,
                "busy_fraction": cost.busy, "active_sequences": cost.active,
                "role": self.role, "replica": self.worker.replica_name,
                "live_sequences": self.worker.live_sequences(), "world_size": world_size(),
                "batches": self._batches, "batched_calls": self._batched_calls, "pid": os.getpid(),
                "kv_tokens_used": used, "kv_tokens_total": total,
                "kv_cache_bytes": runner.cache.bytes, "max_live_seqs": runner.max_live_seqs,
                "dtype": str(runner.model.dtype).removeprefix("torch."),
                "dtype_choice": getattr(runner.model, "dtype_choice", "")}


def unwrap(result):
    """A batch item is a result or the exception its own request raised."""
    if isinstance(result, BaseException):
        raise result
    return result
