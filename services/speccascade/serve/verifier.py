"""Verifier deployment: the target model and its KV caches, one replica per process.

A plain class; `serve.app.build_app` applies Serve to it. Concurrent verifications of different
requests share one target forward through `@serve.batch`.
"""
from __future__ import annotations

from ray import serve

from speccascade.engine.costs import served
from speccascade.engine.seam import VerifyRequest, VerifyResult
from speccascade.engine.workers import VerifyWorker
from speccascade.models.loader import load_model
from speccascade.serve.config import ServiceConfig
from speccascade.serve.replica import ModelReplica, unwrap


class Verifier(ModelReplica):
    role = "verifier"

    def __init__(self, config: ServiceConfig | dict):
        cfg = ServiceConfig.load(config)
        super().__init__(cfg, cfg.verifier)
        target_path, _ = cfg.model_paths()
        model = load_model(target_path, cfg.target.dtype, cfg.target.device)
        self.worker = VerifyWorker(model, max_live_seqs=cfg.max_live_seqs,
                                  idle_evict_s=cfg.kv_idle_evict_s,
                                  kv_cache_tokens=cfg.kv_cache_tokens)
        self._name_worker()
        self._configure_batching(self._verify_batch, cfg.verifier)

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        return await served(self._verify_batch(request), unwrap)

    # Defaults are replaced from the config in __init__; concurrent calls share one forward.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _verify_batch(self, requests: list[VerifyRequest]) -> list:
        return await self._run_batch(self.worker.verify_batch, requests)
