"""serve.ingress.cancel_on_disconnect on a real grpc.aio server and client, without Ray.

`proxy_like` follows the shape of Serve 2.60's gRPC proxy generator (`send_request_to_replica`):
it cancels its call to the router only when cancellation reaches it while it awaits the next
message, and it swallows every exception raised at a `yield`. Its second message is larger than
any flow-control window, so when the client cancels, grpc is stuck writing it and the generator
sits at that `yield`: the moment at which the real proxy leaks the router's call (2 of 30
mid-stream cancels through the service before the fix; tests/test_reliability.py covers that
path end to end).
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from speccascade.serve.ingress import cancel_on_disconnect

METHOD = "/speccascade.test.Stream/Run"
BIG = 32 * 1024 * 1024  # bytes; far above grpc's stream window, so its write waits for a read
NO_LIMIT = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class RouterCall:
    """Stands for the proxy's call to the router: two messages, then it runs forever."""

    def __init__(self):
        self.cancelled = asyncio.Event()
        self.at_second_yield = asyncio.Event()

    async def next(self, i: int) -> bytes:
        if i >= 2:
            await asyncio.Event().wait()  # a long generation
        return b"x" * (BIG if i == 1 else 8)


def proxy_like(call: RouterCall):
    async def unary_stream(request, context):
        try:
            for i in range(10):
                try:
                    message = await call.next(i)
                except asyncio.CancelledError:
                    call.cancelled.set()  # the proxy's only path to cancelling the router
                    raise
                if i == 1:
                    call.at_second_yield.set()
                yield message
        except BaseException:  # noqa: BLE001 - as the proxy does, GeneratorExit included
            pass
    return unary_stream


async def cancel_during_a_write(handler_for, wait_s: float) -> RouterCall:
    call = RouterCall()
    handler = handler_for(proxy_like(call))
    server = grpc.aio.server(options=NO_LIMIT)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "speccascade.test.Stream", {"Run": grpc.unary_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_LIMIT) as channel:
            stream = channel.unary_stream(METHOD)(b"")
            assert len(await stream.read()) == 8
            await asyncio.wait_for(call.at_second_yield.wait(), 10)
            await asyncio.sleep(0.2)  # grpc is now writing the big message nobody reads
            stream.cancel()
            try:
                await asyncio.wait_for(call.cancelled.wait(), wait_s)
            except TimeoutError:
                pass
    finally:
        await server.stop(grace=None)
    return call


def test_the_proxy_shape_leaks_the_router_call_when_cancelled_during_a_write():
    """The harness reproduces the failure: without the wrapper the call is never cancelled."""
    call = asyncio.run(cancel_during_a_write(lambda unary_stream: unary_stream, wait_s=2))
    assert not call.cancelled.is_set()


def test_cancel_on_disconnect_cancels_the_router_call():
    call = asyncio.run(cancel_during_a_write(cancel_on_disconnect, wait_s=10))
    assert call.cancelled.is_set()


@pytest.mark.parametrize("fail", [False, True])
def test_cancel_on_disconnect_passes_messages_and_errors_through(fail):
    async def unary_stream(request, context):
        for i in range(3):
            yield bytes([i])
        if fail:  # how the proxy ends a stream the router failed
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details("bad field")

    async def run():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "speccascade.test.Stream",
            {"Run": grpc.unary_stream_rpc_method_handler(cancel_on_disconnect(unary_stream))}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = channel.unary_stream(METHOD)(b"")
                got = []
                try:
                    async for message in stream:
                        got.append(message)
                except grpc.aio.AioRpcError as error:
                    return got, error.code(), error.details()
                return got, await stream.code(), None
        finally:
            await server.stop(grace=None)

    got, code, details = asyncio.run(run())
    assert got == [b"\x00", b"\x01", b"\x02"]
    if fail:
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "bad field")
    else:
        assert code == grpc.StatusCode.OK
