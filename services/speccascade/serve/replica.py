"""ModelReplica: a drafter or verifier Serve replica, a thin front end to its engine process.

The replica holds no model and runs no torch op. Its engine (serve.engine_core) is a child process
with the model, KV slab and worker, reached over ZMQ (serve.wire). Serve stays the control plane:

- `session(seq_id)` is a streaming call a router keeps open for a request's lifetime. It yields
  the engine's addresses and the sequence's token once, then waits. Serve counts it as one ongoing
  request for as long as the sequence lives, so `max_ongoing_requests`, least-loaded routing and
  autoscaling see live sequences (not whichever per-round calls happen to be in flight), and the
  request's KV stays on the replica that routed its session. When the stream ends (request done,
  cancelled, or its router gone) the `finally` frees the sequence's KV.
- `check_health` fails when the engine process is gone, so Serve replaces the replica.
- `stats` asks the engine.

The engine is spawned (never forked after torch loads) by a thread that lives as long as the
replica and waits on it: the child's parent-death signal fires when that thread exits.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from speccascade.serve import wire
from speccascade.serve.config import ServiceConfig
from speccascade.serve.engine_client import EngineClient, ping_sync
from speccascade.serve.metrics import ReplicaMetrics

ENGINE_START_TIMEOUT_S = 600      # loading a model and calibrating its costs
SESSION_CHECK_S = 1.0             # how often an open session looks at its engine


def serve_replica_name(default: str) -> str:
    """The Serve actor name of this replica ("SERVE_REPLICA::app#Deployment#id"), which
    `ray.get_actor(name, namespace="serve")` finds; `default` when running outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # noqa: BLE001 - not inside a Serve replica (plain use, unit tests)
        return default


def world_size() -> int:
    try:
        from ray import serve

        return serve.get_replica_context().world_size
    except Exception:  # noqa: BLE001
        return 1


def node() -> tuple[str, str]:
    """(Ray node id, the IP its engines bind for callers on other nodes)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray: this host only
        return "local", "127.0.0.1"


class EngineGoneError(RuntimeError):
    """The replica's engine process exited; Serve's health check replaces the replica."""


class ModelReplica:
    """Base of Drafter and Verifier; subclasses set `role` ("drafter" or "verifier")."""

    role = ""

    def __init__(self, config: ServiceConfig | dict):
        self.config = ServiceConfig.load(config)
        self.name = serve_replica_name(f"{self.role}:{os.getpid()}")
        self.node_id, host = node()
        self._secret = secrets.token_bytes(32)
        self._dir = tempfile.mkdtemp(prefix=f"speccascade-{self.role}-")  # mode 0700: ours only
        self.ipc = f"ipc://{self._dir}/engine"
        self._metrics = ReplicaMetrics(self.role)
        self._control: EngineClient | None = None
        self._proc: subprocess.Popen | None = None
        started = threading.Event()
        threading.Thread(target=self._own_engine, args=(host, started), daemon=True,
                         name=f"{self.role}-engine").start()
        started.wait()
        info = self._wait_ready()
        self.engine_pid, self.tcp = info["pid"], info["addresses"]["tcp"]

    # -- the engine process ------------------------------------------------------------------
    def _own_engine(self, host: str, started: threading.Event) -> None:
        """Spawn the engine and wait on it, for the replica's whole life (see the docstring)."""
        spec = {"role": self.role, "config": self.config.model_dump(mode="json"),
                "secret": self._secret.hex(), "ipc": self.ipc, "host": host,
                "replica": self.name, "parent_pid": os.getpid()}
        env = {**os.environ, "OMP_NUM_THREADS": str(getattr(self.config, self.role).torch_threads)}
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "speccascade.serve.engine_core",
                                           self.role],  # the role: for ps, top, py-spy
                                          stdin=subprocess.PIPE, env=env, text=True)
            self._proc.stdin.write(json.dumps(spec) + "\n")  # the secret never shows in `ps`
            self._proc.stdin.close()
        finally:
            started.set()
        self._proc.wait()

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_engine()
            info = ping_sync(self.ipc, self._secret, timeout_s=0.5)
            if info is not None:
                return info
        raise EngineGoneError(f"{self.role} engine not ready after {ENGINE_START_TIMEOUT_S} s")

    def _check_engine(self) -> None:
        code = None if self._proc is None else self._proc.poll()
        if self._proc is None or code is not None:
            raise EngineGoneError(f"{self.role} engine process exited (code {code})")

    async def _call(self, kind: str, seq_id: str = wire.CONTROL_SEQ) -> wire.Reply:
        if self._control is None:
            self._control = EngineClient(self.ipc, decode=wire.decode_control_reply)
        return await self._control.call(kind, seq_id, wire.session_token(self._secret, seq_id))

    def __del__(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- Serve methods -----------------------------------------------------------------------
    async def session(self, seq_id: str):
        """A sequence's lease on this replica (see the module docstring)."""
        self._check_engine()
        yield wire.SessionInfo(replica=self.name, node_id=self.node_id, ipc=self.ipc,
                               tcp=self.tcp, token=wire.session_token(self._secret, seq_id))
        opened = time.monotonic()
        idle_limit = self.config.kv_idle_evict_s
        try:
            while True:
                await asyncio.sleep(SESSION_CHECK_S)
                self._check_engine()  # raising ends the stream: the router fails over
                if time.monotonic() - opened > idle_limit:  # a router that vanished silently
                    idle = (await self._call("stats")).info["idle_s"].get(seq_id)
                    if (idle if idle is not None else time.monotonic() - opened) > idle_limit:
                        return
        finally:
            if self._proc is not None and self._proc.poll() is None:
                await asyncio.shield(self._release(seq_id))

    async def _release(self, seq_id: str) -> None:
        try:
            await asyncio.wait_for(self._call("release", seq_id), 30)
        except Exception:  # noqa: BLE001 - the engine's idle eviction is the backstop
            pass

    async def check_health(self) -> None:
        self._check_engine()
        try:  # the gauges; a slow answer (a long forward) is not a failure
            stats = (await asyncio.wait_for(self._call("stats"), 5)).info
            self._metrics.set_live(stats["live_sequences"], stats["kv_tokens_used"],
                                   stats["kv_tokens_total"])
        except asyncio.TimeoutError:
            pass

    async def stats(self) -> dict[str, Any]:
        self._check_engine()
        stats = (await self._call("stats")).info
        stats.pop("idle_s", None)
        return {**stats, "world_size": world_size(), "front_end_pid": os.getpid()}


class Drafter(ModelReplica):
    role = "drafter"


class Verifier(ModelReplica):
    role = "verifier"
