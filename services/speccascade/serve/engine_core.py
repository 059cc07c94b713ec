"""The engine process: one model, its KV slab and worker, and one loop that owns them.

    python -m speccascade.serve.engine_core      # spawned by serve.replica; its spec on stdin

Why a process of its own (vLLM V1's EngineCoreProc, SGLang's scheduler, REFERENCE.md §13): in the
Serve replica, arrivals were handled in Python on an event loop that had to win the GIL from the
forward thread, so calls reached the model one at a time (mean batch 1.0 at 8 streams). Here ZMQ
buffers arrivals in its own C++ I/O thread while the model runs, and the loop takes all of them at
each step boundary:

    1. wait for a message, blocking while idle (never spin: 2 cores)
    2. drain every message already buffered (and, with batch_wait_timeout_s, wait that long for more)
    3. answer control calls (ping, stats, release) in arrival order; a model call queued before
       its sequence's release is aborted (vLLM's abort), not run after it
    4. run one batched forward over the draft/verify calls (one item per sequence per forward,
       a failing batch retried one by one: serve.batching.isolated), answer each caller
    5. housekeeping: evict idle KV entries, exit if the parent replica is gone

Releases and evictions run in this loop, between forwards, so nothing touches the KV slab
concurrently. The process dies with its replica (PR_SET_PDEATHSIG, and a parent check at every
step); the replica's health check fails when this process is gone, so Serve replaces both.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time

import msgspec
import zmq

from speccascade.serve import wire
from speccascade.serve.batching import isolated

logger = logging.getLogger("speccascade.engine")
IDLE_POLL_MS = 5000   # an idle engine wakes this often (eviction, parent check), never more


class EngineCore:
    def __init__(self, worker, role: str, secret: bytes, *, max_batch_size: int,
                 batch_wait_timeout_s: float, idle_evict_s: float, parent_pid: int):
        self.worker, self.role, self.secret = worker, role, secret
        self.batch_fn = worker.draft_batch if role == "drafter" else worker.verify_batch
        self.model_kind = "draft" if role == "drafter" else "verify"
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_timeout_s * 1000
        self.evict_every_s = idle_evict_s / 2
        self.parent_pid = parent_pid
        self.forwards = self.forward_calls = 0
        self._pending: list[tuple[bytes, wire.Call, float]] = []
        self._next_evict = time.monotonic() + self.evict_every_s
        self._ctx = zmq.Context(io_threads=1)
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.addresses: dict[str, str] = {}
        self.stopped = False  # set by `stop` (tests); a spawned engine runs until it is killed

    def bind(self, ipc: str, host: str) -> None:
        """ipc:// for callers on this node; tcp on the node's own IP (never 0.0.0.0) for others."""
        self.socket.bind(ipc)
        self.addresses["ipc"] = ipc
        self.socket.bind(f"tcp://{host}:0")
        self.addresses["tcp"] = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopped:
            if not self._pending:                                   # 1. block while idle
                self.socket.poll(self._idle_timeout_ms())
            self._drain()                                           # 2.
            if self.batch_wait_ms and self._pending and self.socket.poll(self.batch_wait_ms):
                self._drain()
            model_calls, waiting = [], []
            aborted = self._aborted()
            for k, item in enumerate(self._pending):                # 3.
                if item[1].kind != self.model_kind:
                    self._control(*item)
                elif k in aborted:
                    self._reply(item[0], wire.Reply(item[1].id, error="Aborted",
                                                    message="the sequence was released"))
                elif len(model_calls) < self.max_batch_size:
                    model_calls.append(item)
                else:
                    waiting.append(item)
            self._pending = waiting
            if model_calls:
                self._forward(model_calls)                          # 4.
            self._housekeeping()                                    # 5.
        self.socket.close(linger=0)

    def _aborted(self) -> set[int]:
        """Positions in the queue of model calls whose sequence a later release in the queue
        frees: its caller gave them up (a cancelled request). Control calls are answered before
        the forward, so running them would re-create the KV entry the release just freed."""
        released, aborted = set(), set()
        for k in range(len(self._pending) - 1, -1, -1):
            call = self._pending[k][1]
            if call.kind == "release":
                released.add(call.seq_id)
            elif call.kind == self.model_kind and call.seq_id in released:
                aborted.add(k)
        return aborted

    def stop(self) -> None:
        """End `run` at its next wake-up (any message, or the idle poll) and close the socket."""
        self.stopped = True

    def _idle_timeout_ms(self) -> int:
        return int(max(1, min(IDLE_POLL_MS, (self._next_evict - time.monotonic()) * 1000)))

    def _drain(self) -> None:
        while True:
            try:
                identity, frame = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            except ValueError:  # a peer that sent a multi-frame message: not ours
                continue
            received = time.perf_counter()
            try:
                call = wire.decode_call(frame)
            except Exception as error:  # noqa: BLE001 - answered when it names a call id
                call_id = _call_id(frame)
                if call_id is None:  # garbage on the socket: nobody to answer
                    logger.warning("%s engine: undecodable message dropped (%s)", self.role, error)
                else:  # a field that fails validation (msgspec keeps the ParamError as cause)
                    self._reply(identity, _error_reply(call_id, error.__cause__ or error))
                continue
            if not self._authorized(call):
                self._reply(identity, wire.Reply(call.id, error="PermissionError",
                                                 message="bad session token"))
                continue
            self._pending.append((identity, call, received))

    def _authorized(self, call: wire.Call) -> bool:
        payload = call.draft or call.verify
        if payload is not None and payload.seq_id != call.seq_id:
            return False
        allowed = ("ping", "stats") if call.seq_id == wire.CONTROL_SEQ else (
            "draft", "verify", "release", "ping")
        return call.kind in allowed and wire.token_ok(self.secret, call.seq_id, call.token)

    def _control(self, identity: bytes, call: wire.Call, received: float) -> None:
        try:
            if call.kind == "release":
                self.worker.release(call.seq_id)
                info = {}
            elif call.kind == "ping":
                info = {"pid": os.getpid(), "addresses": self.addresses}
            elif call.kind == "stats":
                info = self.stats()
            else:
                raise ValueError(f"unknown call kind {call.kind!r} for the {self.role} engine")
            self._reply(identity, wire.Reply(call.id, info=info))
        except Exception as error:  # noqa: BLE001 - answered, never raised: the loop goes on
            self._reply(identity, _error_reply(call.id, error))

    def _forward(self, items: list[tuple[bytes, wire.Call, float]]) -> None:
        requests = [call.draft or call.verify for _, call, _ in items]
        results = isolated(self.batch_fn, requests)
        self.forwards += 1
        self.forward_calls += len(items)
        for (identity, call, received), result in zip(items, results):
            if isinstance(result, BaseException):
                self._reply(identity, _error_reply(call.id, result))
                continue
            result.served_ms = (time.perf_counter() - received) * 1000
            self._reply(identity, wire.Reply(call.id, **{self.model_kind: result}))

    def _reply(self, identity: bytes, reply: wire.Reply) -> None:
        self.socket.send_multipart([identity, wire.encode(reply)], copy=False)

    def _housekeeping(self) -> None:
        if os.getppid() != self.parent_pid:  # the replica is gone (PDEATHSIG's backstop)
            logger.warning("%s engine: parent %d gone, exiting", self.role, self.parent_pid)
            os._exit(0)
        if time.monotonic() >= self._next_evict:
            self.worker.runner.evict_idle()
            self._next_evict = time.monotonic() + self.evict_every_s

    def stats(self) -> dict:
        runner, cost = self.worker.runner, self.worker.costs.report()
        used, total = runner.kv_tokens()
        return {"cost_coefficients": list(cost.coef), "mean_batch_rows": cost.rows,
                "busy_fraction": cost.busy, "active_sequences": cost.active, "role": self.role,
                "replica": self.worker.replica_name, "live_sequences": self.worker.live_sequences(),
                "batches": self.forwards, "batched_calls": self.forward_calls, "pid": os.getpid(),
                "kv_tokens_used": used, "kv_tokens_total": total,
                "kv_cache_bytes": runner.cache.bytes, "max_live_seqs": runner.max_live_seqs,
                "dtype": str(runner.model.dtype).removeprefix("torch."),
                "dtype_choice": getattr(runner.model, "dtype_choice", ""),
                "idle_s": runner.idle_seconds()}


def _error_reply(call_id: int, error: BaseException) -> wire.Reply:
    return wire.Reply(call_id, error=type(error).__name__, message=str(error)[:2000],
                      field=getattr(error, "field", None))


def _call_id(frame) -> int | None:
    try:
        call_id = msgspec.msgpack.decode(frame)[1]  # Call is array-like: [kind, id, ...]
    except Exception:  # noqa: BLE001
        return None
    return call_id if isinstance(call_id, int) else None


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that spawned it exits (serve.replica spawns it from a
    thread that lives as long as the replica), then close the race with an explicit check."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the check in the loop remains
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    _die_with_parent(spec["parent_pid"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from speccascade.engine.workers import DraftWorker, VerifyWorker
    from speccascade.models.loader import load_model
    from speccascade.serve.config import ServiceConfig

    cfg = ServiceConfig.load(spec["config"])
    role = spec["role"]
    deployment = getattr(cfg, role)
    torch.set_num_threads(deployment.torch_threads)
    target_path, draft_path = cfg.model_paths()
    model_spec, path = (cfg.draft, draft_path) if role == "drafter" else (cfg.target, target_path)
    worker_class = DraftWorker if role == "drafter" else VerifyWorker
    worker = worker_class(load_model(path, model_spec.dtype, model_spec.device),
                          max_live_seqs=cfg.max_live_seqs, idle_evict_s=cfg.kv_idle_evict_s,
                          kv_cache_tokens=cfg.kv_cache_tokens)
    worker.replica_name = spec["replica"]
    engine = EngineCore(worker, role, bytes.fromhex(spec["secret"]),
                        max_batch_size=deployment.max_batch_size,
                        batch_wait_timeout_s=deployment.batch_wait_timeout_s,
                        idle_evict_s=cfg.kv_idle_evict_s, parent_pid=spec["parent_pid"])
    engine.bind(spec["ipc"], spec["host"])
    logger.info("%s engine %d ready on %s", role, os.getpid(), engine.addresses)
    engine.run()


if __name__ == "__main__":
    main()
