"""RemoteDrafter / RemoteVerifier: the seam's async Drafter and Verifier over Serve handles.

KV-cache affinity: every call of one request carries `session_id=request_id`, and the drafter and
verifier deployments route with Ray's ConsistentHashRouter, so all calls of a request reach the
replica holding its cache (REFERENCE.md §5). Fail-over: a call whose replica died is simply sent
again. Every call carries the full committed sequence, so whichever replica receives it re-prefills
from it and the output is unchanged; the router's committed sequence stays the source of truth.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from speccascade.engine.seam import DraftRequest, DraftResult, VerifyRequest, VerifyResult
from speccascade.serve.errors import ReplicaFailedError

logger = logging.getLogger("ray.serve")

# What a dead or restarting replica looks like to a caller. Errors raised by our own code in a
# replica arrive as RayTaskError and are not retried: a re-send would fail the same way.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


# Ray 2.60: calls made from one incoming request share its internal request id, and the
# ConsistentHashRouter matches routed calls to waiting ones by that id only — so two calls of one
# request in flight to the same deployment at once never complete (reproduced: a burst of 8 hangs,
# the default router serves it in 25 ms). Each adapter therefore keeps at most one call in flight.


class _Remote:
    method = ""  # the deployment method behind the seam call

    def __init__(self, handle, session_id: str, *, attempts: int, backoff_s: float,
                 transport: dict | None = None):
        # Handles are built once per request, not per round (`options` copies a handle).
        # `transport`: ServiceConfig.transport.handle_options(), e.g. interdeployment gRPC.
        base = handle.options(session_id=session_id, **(transport or {}))
        self._handle = base.options(method_name=self.method)
        self._release_handle = base.options(method_name="release")
        self._session_id = session_id
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._one_at_a_time = asyncio.Lock()

    async def _send(self, handle, *args):
        async with self._one_at_a_time:
            return await handle.remote(*args)

    async def _call(self, *args):
        for attempt in range(self._attempts + 1):
            try:
                return await self._send(self._handle, *args)
            except REPLICA_LOST as error:
                if attempt == self._attempts:
                    raise ReplicaFailedError(f"{self.method} failed {attempt + 1} times: "
                                             f"{type(error).__name__}") from error
                logger.warning("%s of %s: replica lost (%s), sending again", self.method,
                               self._session_id, type(error).__name__)
                # Until Serve notices the death the ring may still name the dead replica.
                await asyncio.sleep(self._backoff_s * 2 ** attempt)

    async def release(self, seq_id: str) -> None:
        # No retry: a replica that died took the sequence's cache with it. Sent from an empty
        # context, i.e. not as a child call of the request: Serve cancels the in-flight child calls
        # of a cancelled request (client cancel or deadline), and this call must still arrive.
        call = asyncio.get_running_loop().create_task(self._send(self._release_handle, seq_id),
                                                      context=contextvars.Context())
        await asyncio.shield(call)


class RemoteDrafter(_Remote):
    method = "draft"

    async def draft(self, request: DraftRequest) -> DraftResult:
        return await self._call(request)


class RemoteVerifier(_Remote):
    method = "verify"

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        return await self._call(request)
