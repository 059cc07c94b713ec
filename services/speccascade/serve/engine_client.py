"""EngineClient: the caller's side of the data path, hiding the process boundary.

One DEALER socket per engine per calling process, shared by every request of that process; calls
are multiplexed on it and matched to replies by id, so many sequences' calls are in flight at
once and reach the engine's queue together (where they share a forward). `clients` keeps one
client per address and closes it when the last session using it ends.

An error the engine answered is raised here as the class the service maps to a status
(serve.errors): a full KV budget stays RESOURCE_EXHAUSTED, a bad field INVALID_ARGUMENT.
"""
from __future__ import annotations

import asyncio
import itertools

import zmq
import zmq.asyncio

from speccascade.serve import wire


class EngineCallError(RuntimeError):
    """An engine failed a call with an error that is not the caller's fault (INTERNAL)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def raise_for(reply: wire.Reply | wire.ControlReply) -> None:
    if reply.error is None:
        return
    from speccascade.models.runner import CapacityError, ContextLengthError
    from speccascade.sampling import ParamError

    if reply.error == "CapacityError":
        raise CapacityError(reply.message)
    if reply.error == "ContextLengthError":
        raise ContextLengthError(reply.message)
    if reply.error == "ParamError" or (reply.field and reply.error == "ValueError"):
        raise ParamError(reply.field or "request", reply.message)
    if reply.error == "PermissionError":
        raise PermissionError(f"engine refused the call: {reply.message}")
    raise EngineCallError(reply.error, reply.message)


class EngineClient:
    def __init__(self, address: str, decode=wire.decode_reply):
        self.address, self._decode = address, decode
        self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self.users = 0

    async def call(self, kind: str, seq_id: str, token: bytes, **payload) -> wire.Reply:
        """Send one call and wait for its reply; raise what the engine answered as an error."""
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.get_loop() is not loop:
            self._reader = loop.create_task(self._read())
        call_id = next(self._ids)
        future = self._waiting[call_id] = loop.create_future()
        try:
            await self._socket.send(wire.encode(wire.Call(kind, call_id, seq_id, token, **payload)),
                                    copy=False)
            reply = await future
        finally:
            self._waiting.pop(call_id, None)
        raise_for(reply)
        return reply

    async def _read(self) -> None:
        while True:
            reply = self._decode(await self._socket.recv(copy=True))
            future = self._waiting.get(reply.id)
            if future is not None and not future.done():
                future.set_result(reply)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for future in self._waiting.values():
            future.cancel()
        self._socket.close(linger=0)


class _Clients:
    """One EngineClient per address in this process, closed when its last user lets go."""

    def __init__(self):
        self._by_address: dict[str, EngineClient] = {}

    def acquire(self, address: str) -> EngineClient:
        client = self._by_address.get(address)
        if client is None:
            client = self._by_address[address] = EngineClient(address)
        client.users += 1
        return client

    def release(self, client: EngineClient) -> None:
        client.users -= 1
        if client.users <= 0 and self._by_address.get(client.address) is client:
            del self._by_address[client.address]
            client.close()


clients = _Clients()


def ping_sync(address: str, secret: bytes, timeout_s: float) -> dict | None:
    """One control ping without an event loop (a replica's constructor waiting for its engine);
    the engine's info, or None if it did not answer within timeout_s."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        socket.send(wire.encode(wire.Call("ping", 0, wire.CONTROL_SEQ,
                                          wire.session_token(secret, wire.CONTROL_SEQ))))
        if not socket.poll(int(timeout_s * 1000)):
            return None
        reply = wire.decode_control_reply(socket.recv())
        raise_for(reply)
        return reply.info
    finally:
        socket.close(linger=0)
