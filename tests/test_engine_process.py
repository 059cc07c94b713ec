"""The engine process and its data path, without Serve: the wire format, the engine's loop (batches
formed from its queue, tokens checked, KV released) and the process's life (it dies with its
replica). Tiny random checkpoints from conftest, float64."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from speccascade.engine.seam import DraftRequest, SparseDraft, VerifyRequest
from speccascade.engine.workers import DraftWorker
from speccascade.models.loader import load_model
from speccascade.sampling import CascadeParams, DeferralRule, ParamError, SamplingParams
from speccascade.serve import wire
from speccascade.serve.engine_client import EngineCallError, EngineClient
from speccascade.serve.engine_core import EngineCore

SECRET = b"s" * 32


def test_wire_round_trips_the_seam_types():
    q = SparseDraft(torch.tensor([[3, 1], [2, 0]], dtype=torch.int32),
                    torch.tensor([[0.75, 0.25], [1.0, 0.0]]), torch.tensor([[0.5, 0.1], [0.9, 0.0]]))
    request = VerifyRequest("seq", list(range(300)), [5, 6],
                            SamplingParams(0.8, 0, 0.95, 7, min_p=0.05, eta=3e-4, lenience=0.5), q,
                            CascadeParams(DeferralRule.TOKEN_V2, 0.25))
    call = wire.decode_call(wire.encode(wire.Call("verify", 9, "seq", b"t", verify=request)))
    got = call.verify
    assert (call.kind, call.id, got.tokens, got.draft_tokens) == ("verify", 9, request.tokens, [5, 6])
    assert got.sampling == request.sampling and got.cascade == request.cascade
    for a, b in ((got.draft_q.indices, q.indices), (got.draft_q.probs, q.probs),
                 (got.draft_q.raw, q.raw)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # decoding validates like construction does: a bad field is a ParamError naming it
    import msgspec

    raw = msgspec.msgpack.decode(wire.encode(wire.Call("draft", 1, "s", b"t", draft=DraftRequest(
        "s", [1], 2, SamplingParams(), 1))))
    raw[4]["sampling"]["temperature"] = -1.0  # Call is array-like; field 4 is the DraftRequest
    with pytest.raises(msgspec.ValidationError) as error:
        wire.decode_call(msgspec.msgpack.encode(raw))
    assert isinstance(error.value.__cause__, ParamError)
    assert error.value.__cause__.field == "temperature"
    # a control reply is read without the model types
    reply = wire.decode_control_reply(wire.encode(wire.Reply(3, info={"pid": 1})))
    assert (reply.id, reply.info, reply.error) == (3, {"pid": 1}, None)


@pytest.fixture()
def engine(tiny_pair, tmp_path):
    """An EngineCore over the tiny draft model, bound but not yet running: a test queues calls
    first, then `start` runs the loop on a thread (the spawned process runs the same loop)."""
    worker = DraftWorker(load_model(tiny_pair[1], "float64"), max_live_seqs=8)
    core = EngineCore(worker, "drafter", SECRET, max_batch_size=16, batch_wait_timeout_s=0.0,
                      idle_evict_s=600, parent_pid=os.getppid())
    core.bind(f"ipc://{tmp_path}/engine", "127.0.0.1")
    thread = threading.Thread(target=core.run, daemon=True)
    core.start = thread.start
    yield core
    core.stop()
    if thread.is_alive():
        asyncio.run(_ping(core))  # wakes the loop, which then ends
        thread.join(10)
    elif thread.ident is None:  # never started: close the socket `run` closes at its end (an
        core.socket.close(linger=0)  # open socket makes the context's GC block in term())


async def _ping(core):
    client = EngineClient(core.addresses["ipc"])
    try:
        return await client.call("ping", wire.CONTROL_SEQ,
                                 wire.session_token(SECRET, wire.CONTROL_SEQ))
    finally:
        client.close()


def _draft(seq: str, n: int = 3) -> DraftRequest:
    return DraftRequest(seq, [1, 2, 3, 4 + len(seq)], n, SamplingParams(), 4)


def test_calls_queued_during_a_step_share_one_forward(engine, tiny_pair):
    """Eight sequences' calls that reach the engine together run as one batched forward per
    draft step, and each answer equals the worker's own answer for that request alone."""
    async def main():
        client = EngineClient(engine.addresses["tcp"])  # tcp here; ipc in the tests below
        seqs = [f"s{i}" for i in range(8)]
        calls = [asyncio.ensure_future(client.call("draft", s, wire.session_token(SECRET, s),
                                                   draft=_draft(s))) for s in seqs]
        await asyncio.sleep(0.2)  # all eight are in ZMQ's queue before the loop starts
        engine.start()
        replies = await asyncio.gather(*calls)
        client.close()
        return replies

    replies = asyncio.run(main())
    assert (engine.forwards, engine.forward_calls) == (1, 8)
    alone = DraftWorker(load_model(tiny_pair[1], "float64"), max_live_seqs=8)
    for i, reply in enumerate(replies):
        assert reply.draft.tokens == alone.draft_batch([_draft(f"s{i}")])[0].tokens
        assert reply.draft.served_ms > 0


def test_engine_refuses_calls_without_the_session_token(engine):
    engine.start()

    async def main():
        client = EngineClient(engine.addresses["ipc"])
        try:
            with pytest.raises(PermissionError):  # another sequence's token
                await client.call("draft", "a", wire.session_token(SECRET, "b"), draft=_draft("a"))
            with pytest.raises(PermissionError):  # the right id, a token of another secret
                await client.call("draft", "a", wire.session_token(b"x" * 32, "a"),
                                  draft=_draft("a"))
            with pytest.raises(PermissionError):  # a session token cannot read stats
                await client.call("stats", "a", wire.session_token(SECRET, "a"))
            with pytest.raises(PermissionError):  # nor name another sequence in its payload
                await client.call("draft", "a", wire.session_token(SECRET, "a"), draft=_draft("b"))
            reply = await client.call("draft", "a", wire.session_token(SECRET, "a"),
                                      draft=_draft("a"))
            assert len(reply.draft.tokens) == 3
        finally:
            client.close()

    asyncio.run(main())
    assert engine.worker.live_sequences() == 1 and engine.forward_calls == 1


def test_release_frees_kv_and_errors_are_answered_not_raised(engine):
    engine.start()

    async def main():
        client = EngineClient(engine.addresses["ipc"])
        token = wire.session_token(SECRET, "a")
        try:
            await client.call("draft", "a", token, draft=_draft("a"))
            assert engine.worker.live_sequences() == 1
            await client.call("release", "a", token)
            assert engine.worker.live_sequences() == 0
            too_long = DraftRequest("a", [1] * 300, 4, SamplingParams(), 300)  # context is 256
            with pytest.raises(ValueError):
                await client.call("draft", "a", token, draft=too_long)
            await client.call("draft", "a", token, draft=_draft("a"))  # the loop goes on
        finally:
            client.close()

    asyncio.run(main())


def test_a_release_queued_after_a_call_aborts_it_and_leaks_nothing(engine):
    """A cancelled request sends its release right behind a draft call still in the queue: the
    release is answered before the forward, so the call must not run after it and re-create the
    KV entry (that leaked a slot per cancelled stream until idle eviction)."""
    async def main():
        client = EngineClient(engine.addresses["ipc"])
        token = wire.session_token(SECRET, "a")
        draft = asyncio.ensure_future(client.call("draft", "a", token, draft=_draft("a")))
        release = asyncio.ensure_future(client.call("release", "a", token))
        other = asyncio.ensure_future(client.call("draft", "b", wire.session_token(SECRET, "b"),
                                                  draft=_draft("b")))
        await asyncio.sleep(0.2)  # all three are in ZMQ's queue before the loop starts
        engine.start()
        try:
            await release
            with pytest.raises(EngineCallError, match="released"):
                await draft
            assert len((await other).draft.tokens) == 3  # another sequence's call still runs
        finally:
            client.close()

    asyncio.run(main())
    assert engine.worker.live_sequences() == 1 and engine.forward_calls == 1  # only "b"


def test_a_cancelled_round_gives_up_its_engine_call(engine):
    """The router's Session.call waits on the engine call and the session's end; cancelling the
    request must cancel the engine call too, not leave it running unowned (its late reply then
    raised in an orphan task, and before the release-abort it re-created the KV entry)."""
    from types import SimpleNamespace

    from speccascade.serve.remote import Session

    async def main():
        client = EngineClient(engine.addresses["ipc"])
        session = Session.__new__(Session)  # the data path only: no Serve stream here
        session.client, session.seq_id = client, "a"
        session.info = SimpleNamespace(token=wire.session_token(SECRET, "a"), replica="r")
        session.ended = asyncio.get_running_loop().create_future()
        try:
            round_ = asyncio.ensure_future(session.call("draft", draft=_draft("a")))
            while not client._waiting:  # the call is on the socket (the engine is not running)
                await asyncio.sleep(0.01)
            round_.cancel()
            with pytest.raises(asyncio.CancelledError):
                await round_
            await asyncio.sleep(0)  # the engine call's own cancellation runs
            assert not client._waiting
        finally:
            client.close()

    asyncio.run(main())


def test_engine_dies_with_its_replica(tiny_pair, tmp_path):
    """A replica process that is killed outright (no cleanup runs) takes its engine with it."""
    target, draft = tiny_pair
    script = textwrap.dedent(f"""
        import sys, time
        from speccascade.serve.replica import Drafter
        replica = Drafter({{"target": {{"path": {str(target)!r}, "dtype": "float64"}},
                            "draft": {{"path": {str(draft)!r}, "dtype": "float64"}}}})
        print(replica.engine_pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(parent.stdout.readline())
        os.kill(engine_pid, 0)  # alive
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while _alive(engine_pid):
            assert time.monotonic() < deadline, "engine outlived its replica"
            time.sleep(0.1)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_call_with_an_invalid_field_is_answered_with_its_field(engine):
    import msgspec

    engine.start()
    raw = msgspec.msgpack.decode(wire.encode(wire.Call(
        "draft", 0, "a", wire.session_token(SECRET, "a"), draft=_draft("a"))))
    raw[4]["sampling"]["top_p"] = 2.0

    async def main():
        client = EngineClient(engine.addresses["ipc"])
        try:
            future = asyncio.get_running_loop().create_future()
            client._waiting[0] = future  # the id the hand-made frame carries
            client._reader = asyncio.get_running_loop().create_task(client._read())
            await client._socket.send(msgspec.msgpack.encode(raw))
            return await asyncio.wait_for(future, 30)
        finally:
            client.close()

    reply = asyncio.run(main())
    assert (reply.error, reply.field) == ("ParamError", "top_p")
