"""RemoteDrafter / RemoteVerifier: the seam's Drafter and Verifier, a session and a direct data path.

Per request and side, one Serve call opens a session (serve.replica.ModelReplica.session): Serve
routes it to the least-loaded replica and counts it while it stays open; it yields the engine's
address and the sequence's token. Every round then goes straight to that engine over ZMQ
(serve.engine_client), ipc:// on the same node, tcp on the node's IP otherwise. KV affinity holds
by construction: the session pins the request to one replica.

Fail-over: a session's stream ends or fails when its replica or engine dies. A call racing that
end is abandoned and sent again on a new session, which Serve routes to a live replica. Every call
carries the full committed sequence, so the new replica re-prefills from it and the output is
unchanged; the router's committed sequence stays the source of truth.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from speccascade.engine.seam import DraftRequest, DraftResult, VerifyRequest, VerifyResult
from speccascade.serve import wire
from speccascade.serve.engine_client import clients
from speccascade.serve.errors import ReplicaFailedError
from speccascade.serve.replica import EngineGoneError

logger = logging.getLogger("ray.serve")

# What a dead or restarting replica looks like to a caller (a replica whose engine died answers
# EngineGoneError until Serve replaces it).
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError,
                EngineGoneError)


class SessionLostError(RuntimeError):
    """The session's replica or engine went away while a call was in flight."""


class Session:
    """One sequence's open session on one replica: its Serve stream and its engine's client."""

    def __init__(self, stream, info: wire.SessionInfo, seq_id: str, node_id: str):
        self.stream, self.info, self.seq_id = stream, info, seq_id
        self.client = clients.acquire(info.ipc if info.node_id == node_id else info.tcp)
        # The stream yields nothing more while the session lives: this finishes only at its end.
        self.ended = asyncio.ensure_future(anext(stream, None))
        self.ended.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, not logged

    @classmethod
    async def open(cls, handle, seq_id: str, node_id: str) -> "Session":
        stream = handle.options(stream=True, method_name="session").remote(seq_id)
        info = await anext(stream)
        return cls(stream, info, seq_id, node_id)

    async def call(self, kind: str, **payload) -> wire.Reply:
        call = asyncio.ensure_future(self.client.call(kind, self.seq_id, self.info.token,
                                                      **payload))
        try:
            done, _ = await asyncio.wait({call, self.ended}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request was cancelled: give up the call with it
            call.cancel()
            raise
        if call in done:
            return call.result()
        call.cancel()
        error = None if self.ended.cancelled() else self.ended.exception()
        raise SessionLostError(f"session on {self.info.replica} ended: "
                               f"{type(error).__name__ if error else 'stream closed'}")

    async def close(self, release: bool) -> None:
        try:
            if release and not self.ended.done():
                with contextlib.suppress(Exception):
                    await self.call("release")
        finally:
            self.stream.cancel()       # the replica's session ends (its finally also releases)
            self.ended.cancel()
            clients.release(self.client)


class _Remote:
    kind = ""  # "draft" or "verify"

    def __init__(self, handle, seq_id: str, *, attempts: int, backoff_s: float, node_id: str):
        self._handle, self._seq_id, self._node_id = handle, seq_id, node_id
        self._attempts, self._backoff_s = attempts, backoff_s
        self._session: Session | None = None
        self._opening = asyncio.Lock()

    async def _open(self) -> Session:
        async with self._opening:
            if self._session is None:
                self._session = await Session.open(self._handle, self._seq_id, self._node_id)
            return self._session

    async def _drop(self, session: Session | None) -> None:
        if session is not None and self._session is session:
            self._session = None
            await session.close(release=False)

    async def _call(self, request):
        for attempt in range(self._attempts + 1):
            session = None
            try:
                session = await self._open()
                reply = await session.call(self.kind, **{self.kind: request})
                return getattr(reply, self.kind)
            except (SessionLostError, *REPLICA_LOST) as error:
                await self._drop(session)
                if attempt == self._attempts:
                    raise ReplicaFailedError(f"{self.kind} failed {attempt + 1} times: "
                                             f"{error}") from error
                logger.warning("%s of %s: %s, opening a new session", self.kind, self._seq_id,
                               error)
                await asyncio.sleep(self._backoff_s * 2 ** attempt)

    async def release(self, seq_id: str) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close(release=True)


class RemoteDrafter(_Remote):
    kind = "draft"

    async def draft(self, request: DraftRequest) -> DraftResult:
        return await self._call(request)


class RemoteVerifier(_Remote):
    kind = "verify"

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        return await self._call(request)
