"""The servicer functions Serve's gRPC proxy registers: `speccascade.v1.Generation` and the
standard `grpc.health.v1.Health` (both served by the router: Serve routes a call by its method
name, and `Check`/`Watch` do not clash with ours; reflection lists every registered service).

They are the generated `add_*Servicer_to_server` with two changes.

- Undecodable requests. The proxy parses each request itself, before any of our code runs, and a
  GenerateRequest that does not parse (protobuf rejects a string field holding invalid UTF-8)
  would be answered with a bare INTERNAL. Here such a request becomes an `Undecodable` naming the
  field, which the router's validation (serve.request) answers with INVALID_ARGUMENT like every
  other bad field.
- Streams stop when their client goes away (`cancel_on_disconnect`), a health Watch included.

The proxy imports this module: it stays light (no torch, no transformers).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from speccascade.v1 import generation_pb2 as pb
from speccascade.v1 import generation_pb2_grpc as pb_grpc

STRING_FIELDS = {1: "prompt", 12: "stop"}  # GenerateRequest field number -> name
DECODED_METHODS = ("Generate", "GenerateStream")


@dataclass(frozen=True)
class Undecodable:
    """A GenerateRequest the proxy could not parse; crosses to the router in its place."""
    field: str
    reason: str
    size: int


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if i >= len(data):
            break
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
    raise ValueError("malformed varint")


def _bad_string_field(data: bytes) -> str | None:
    """The first string field whose bytes are not UTF-8, by walking the wire format (the parsed
    message does not exist); None when the message is malformed some other way."""
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type in (1, 5):
                i += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, i = _varint(data, i)
                chunk, i = data[i:i + length], i + length
                if number in STRING_FIELDS:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return STRING_FIELDS[number]
            else:
                return None
    except ValueError:
        return None
    return None


def decode_request(data: bytes) -> pb.GenerateRequest | Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        field = _bad_string_field(data)
        if field is not None:
            return Undecodable(field, f"{field} must be valid UTF-8", len(data))
        return Undecodable("request", "request is not a valid GenerateRequest message", len(data))


class _Collect:
    """Stands in for the server to collect the generated method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def cancel_on_disconnect(unary_stream):
    """`unary_stream` (the proxy's handler of a server-streaming RPC), made to stop its call to
    the router when the client goes away at any moment.

    Serve 2.60's proxy cancels its call to the router only when the client goes away while the
    proxy awaits the router's next message. When the client goes away while grpc is sending a
    message, grpc stops iterating the proxy's generator and leaves it suspended at a `yield`;
    when it is closed later, the proxy swallows the GeneratorExit and the router's call runs to
    its end, holding a router slot and KV entries (measured: 2 of 30 mid-stream cancels, see
    tests/test_ingress.py). Here the proxy's generator runs in a task that only ever waits for
    the router (messages go to an unbounded queue) and this handler is a coroutine that writes
    them: grpc cancels the handler wherever it waits, and the handler cancels that task and
    waits for the proxy to finish, all while the RPC is still open (after it closes, touching
    its context crashes the process)."""
    end = object()

    async def handler(request, context) -> None:
        messages: asyncio.Queue = asyncio.Queue()

        async def pump():
            try:
                async for message in unary_stream(request, context):
                    messages.put_nowait(message)
            finally:
                messages.put_nowait(end)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            while (message := await messages.get()) is not end:
                await context.write(message)
            await task  # the proxy's own errors surface here
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    return handler


def _cancelling_streams(factory):
    """Serve's handler factory with every server-streaming handler under cancel_on_disconnect."""
    def make(service_method, streaming_type):
        made = factory(service_method=service_method, streaming_type=streaming_type)
        return cancel_on_disconnect(made) if streaming_type.name == "UNARY_STREAM" else made
    return make


def _register(add_generated, servicer, server, decoded: tuple[str, ...] = ()) -> None:
    found = _Collect()
    add_generated(servicer, found)
    handlers = {name: handler._replace(request_deserializer=decode_request)
                if name in decoded else handler
                for name, handler in found.handlers.items()}
    # Serve's server builds its handlers with `service_handler_factory` while they are added;
    # the wrapped factory applies to this service only.
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None:
        server.service_handler_factory = _cancelling_streams(factory)
    try:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(found.service,
                                                                              handlers),))
        server.add_registered_method_handlers(found.service, handlers)
    finally:
        if factory is not None:
            server.service_handler_factory = factory


def add_GenerationServicer_to_server(servicer, server) -> None:  # noqa: N802 - grpc's name
    _register(pb_grpc.add_GenerationServicer_to_server, servicer, server, DECODED_METHODS)


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802 - grpc's name
    _register(health_pb2_grpc.add_HealthServicer_to_server, servicer, server)
