"""In-process Drafter and Verifier: the workers behind an asyncio micro-batcher.

Calls issued in the same event-loop tick share one forward, like `@serve.batch` does in the
service. Each side runs its forwards on its own thread, so drafting really overlaps verification
(torch releases the GIL inside its kernels).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from speccascade.engine.costs import served
from speccascade.engine.seam import DraftRequest, DraftResult, VerifyRequest, VerifyResult
from speccascade.engine.workers import DraftWorker, VerifyWorker


class MicroBatcher:
    def __init__(self, batch_fn: Callable[[list], list], max_batch_size: int = 32):
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self._queue: asyncio.Queue | None = None
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._consumer: asyncio.Task | None = None

    async def submit(self, item) -> Any:
        if self._consumer is None or self._consumer.get_loop() is not asyncio.get_running_loop():
            self._queue = asyncio.Queue()
            self._consumer = asyncio.get_running_loop().create_task(self._consume())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(0)  # let every coroutine that is ready this tick enqueue
            while not self._queue.empty() and len(batch) < self.max_batch_size:
                batch.append(self._queue.get_nowait())
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.batch_fn, [item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def call(self, fn: Callable, *args) -> Any:
        """Run fn on the batch thread, so it never races a forward."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
        self._executor.shutdown(wait=False)


class LocalDrafter:
    def __init__(self, worker: DraftWorker, max_batch_size: int = 32):
        self.worker = worker
        self._batcher = MicroBatcher(worker.draft_batch, max_batch_size)

    async def draft(self, request: DraftRequest) -> DraftResult:
        return await served(self._batcher.submit(request))

    async def release(self, seq_id: str) -> None:
        await self._batcher.call(self.worker.release, seq_id)


class LocalVerifier:
    def __init__(self, worker: VerifyWorker, max_batch_size: int = 32):
        self.worker = worker
        self._batcher = MicroBatcher(worker.verify_batch, max_batch_size)

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        return await served(self._batcher.submit(request))

    async def release(self, seq_id: str) -> None:
        await self._batcher.call(self.worker.release, seq_id)
