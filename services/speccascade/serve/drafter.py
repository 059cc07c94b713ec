"""Drafter deployment: the draft model and its KV caches, one replica per process.

A plain class; `serve.app.build_app` applies Serve to it. Callers reach the replica holding a
sequence's cache through consistent hashing on the request id (see serve.remote).
"""
from __future__ import annotations

from ray import serve

from speccascade.engine.costs import served
from speccascade.engine.seam import DraftRequest, DraftResult
from speccascade.engine.workers import DraftWorker
from speccascade.models.loader import load_model
from speccascade.serve.config import ServiceConfig
from speccascade.serve.replica import ModelReplica, unwrap


class Drafter(ModelReplica):
    role = "drafter"

    def __init__(self, config: ServiceConfig | dict):
        cfg = ServiceConfig.load(config)
        super().__init__(cfg, cfg.drafter)
        _, draft_path = cfg.model_paths()
        model = load_model(draft_path, cfg.draft.dtype, cfg.draft.device)
        self.worker = DraftWorker(model, max_live_seqs=cfg.max_live_seqs,
                                 idle_evict_s=cfg.kv_idle_evict_s,
                                 kv_cache_tokens=cfg.kv_cache_tokens)
        self._name_worker()
        self._configure_batching(self._draft_batch, cfg.drafter)

    async def draft(self, request: DraftRequest) -> DraftResult:
        return await served(self._draft_batch(request), unwrap)

    # Defaults are replaced from the config in __init__; concurrent calls share one forward.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _draft_batch(self, requests: list[DraftRequest]) -> list:
        return await self._run_batch(self.worker.draft_batch, requests)
