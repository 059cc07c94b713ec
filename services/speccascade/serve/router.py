"""Router: the ingress of the service (Serve's gRPC proxy and, through serve.http, its HTTP proxy).

Method names equal the RPC names of `speccascade.v1.Generation` and of the standard
`grpc.health.v1.Health` (`Check`, `Watch`); `GenerateStream` and `Watch` are async generators,
which Serve serves as server-streaming RPCs. serve.http adds the OpenAI-compatible HTTP routes to
this class, so both doors run in one replica and share `_deltas`. For each request the router
validates it (serve.request), opens a session on a drafter and a verifier replica whose rounds
then go straight to their engine processes (serve.remote) and runs the shared generation loop
(engine.loop), which holds the committed sequence. Every failure is answered through serve.errors, never as a bare INTERNAL.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
import urllib.parse
import uuid
from typing import AsyncIterator

from grpc_health.v1 import health_pb2
from transformers import AutoConfig

from speccascade.engine.controller import SpeculationController
from speccascade.engine.loop import Delta, generate
from speccascade.engine.seam import RequestStats
from speccascade.models.loader import check_pair, load_tokenizer
from speccascade.serve import errors
from speccascade.serve.config import ServiceConfig
from speccascade.serve.metrics import RouterMetrics
from speccascade.serve.remote import RemoteDrafter, RemoteVerifier, Session
from speccascade.serve.replica import serve_replica_name
from speccascade.serve.request import Limits, RequestFields, to_generation_request
from speccascade.v1 import generation_pb2 as pb

# Health service names Check and Watch answer for: the whole server ("") and ours.
HEALTH_SERVICES = ("", pb.DESCRIPTOR.services_by_name["Generation"].full_name)
HEALTH_WATCH_PERIOD_S = 5.0

FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "length": pb.LENGTH, "stop": pb.STOP,
                  "eos": pb.EOS}


def stats_message(stats: RequestStats) -> pb.GenerationStats:
    return pb.GenerationStats(
        rounds=stats.rounds, drafted=stats.drafted, accepted=stats.accepted,
        mean_accepted_length=stats.mean_accepted_length, deferrals=stats.deferrals,
        ttft_ms=stats.ttft_ms, total_ms=stats.total_ms, draft_ms=stats.draft_ms,
        verify_ms=stats.verify_ms, overlap_fraction=stats.overlap_fraction,
        acceptance_rate=stats.acceptance_rate, replicas=sorted(stats.replicas),
        drafted_ahead=stats.drafted_ahead, discarded_draft_tokens=stats.discarded_draft_tokens,
        mean_num_draft_tokens=stats.mean_gamma, num_draft_tokens_histogram=stats.gamma_histogram)


def is_loopback_host(host: str | None) -> bool:
    """An IP address (HTTP's client host): 127.0.0.0/8, ::1, or IPv4-mapped ::ffff:127.x."""
    try:
        ip = ipaddress.ip_address((host or "").split("%")[0])  # without an IPv6 zone id
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def is_loopback_peer(peer: str) -> bool:
    """A gRPC peer string as grpc 1.85 writes it: "ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000"
    (URL-encoded brackets, for a client that connected to localhost or [::1]), "unix:" or
    "unix:/path", "unix-abstract:name". Unix sockets are local by nature."""
    kind, _, address = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = urllib.parse.unquote(address).rpartition(":")[0]
    return is_loopback_host(host.removeprefix("[").removesuffix("]"))


async def within(deltas: AsyncIterator[Delta], deadline: float) -> AsyncIterator[Delta]:
    """`deltas` until time.monotonic() reaches `deadline`, then TimeoutError (DEADLINE_EXCEEDED).

    The proxy already cancels the router when the client's own deadline passes; this bounds
    requests whose client set none. On timeout, wait_for cancels the pending round inside the
    loop, whose `finally` then releases the request's KV entries. A timeout per round, not one
    `asyncio.timeout` around the loop: a timeout scope must not span a `yield` (it would cancel
    whatever the consumer is awaiting instead of the loop)."""
    while True:
        try:
            delta = await asyncio.wait_for(anext(deltas), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        yield delta


async def _timed(call) -> float:
    started = time.perf_counter()
    await call
    return (time.perf_counter() - started) * 1000


class Router:
    def __init__(self, drafter, verifier, config: ServiceConfig | dict):
        self.config = cfg = ServiceConfig.load(config)
        self._drafter, self._verifier = drafter, verifier
        target_path, draft_path = cfg.model_paths()
        check_pair(target_path, draft_path)
        self.tokenizer = load_tokenizer(target_path)
        target = AutoConfig.from_pretrained(target_path, local_files_only=True)
        draft = AutoConfig.from_pretrained(draft_path, local_files_only=True)
        self.limits = Limits.from_config(
            cfg, vocab_size=target.vocab_size,
            max_seq_len=min(target.max_position_embeddings, draft.max_position_embeddings))
        self._inflight = 0
        self._metrics = RouterMetrics()
        from speccascade.serve.replica import node

        # Sessions on engines of this node use their ipc:// socket (unless the config says tcp).
        self._node_id = node()[0] if cfg.transport.prefer_ipc else "never-ipc"
        self._controller = SpeculationController(cfg.controller_max_num_draft_tokens)

    # -- RPCs --------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        ids, texts, last = [], [], None
        try:
            self._check_peer(grpc_context)
            async with contextlib.aclosing(self._deltas(request)) as deltas:
                async for delta in deltas:
                    ids.extend(delta.token_ids)
                    texts.append(delta.text)
                    last = delta
        except Exception as exc:  # noqa: BLE001 - every failure gets an explicit status
            errors.set_status(grpc_context, exc)
            return pb.GenerateResponse()
        return pb.GenerateResponse(text="".join(texts), token_ids=ids,
                                   finish_reason=FINISH_REASONS[last.finish_reason],
                                   stats=stats_message(last.stats))

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context) -> AsyncIterator[pb.GenerateStreamResponse]:
        # aclosing: a client that goes away closes this generator, and with it at once the loop,
        # whose `finally` releases the request's KV entries.
        try:
            self._check_peer(grpc_context)
            async with contextlib.aclosing(self._deltas(request)) as deltas:
                async for delta in deltas:
                    done = delta.finish_reason is not None
                    yield pb.GenerateStreamResponse(
                        text=delta.text, token_ids=delta.token_ids,
                        finish_reason=FINISH_REASONS[delta.finish_reason],
                        stats=stats_message(delta.stats) if done else None)
        except Exception as exc:
            # A stream can only end with an error by raising; Serve keeps the status set here.
            raise errors.set_status(grpc_context, exc) from None

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        limits = self.limits
        try:
            self._check_peer(grpc_context)
        except errors.PeerNotAllowedError as exc:
            errors.set_status(grpc_context, exc)
            return pb.HealthResponse()
        serving, detail, (draft, target) = await self._serving()
        return pb.HealthResponse(
            serving=serving, detail=detail, vocab_size=limits.vocab_size,
            max_seq_len=limits.max_seq_len, max_new_tokens=limits.max_new_tokens,
            default_num_draft_tokens=limits.default_num_draft_tokens or 0,
            max_num_draft_tokens=limits.max_num_draft_tokens,
            target_dtype=target.get("dtype", ""), draft_dtype=draft.get("dtype", ""))

    async def Stats(self, request: pb.StatsRequest, grpc_context) -> pb.StatsResponse:
        try:
            self._check_peer(grpc_context)
            found = await asyncio.gather(self._every_replica(self._drafter),
                                         self._every_replica(self._verifier))
        except Exception as exc:  # noqa: BLE001
            errors.set_status(grpc_context, exc)
            return pb.StatsResponse()
        replicas = [pb.ReplicaStats(role=s["role"], replica=s["replica"],
                                    live_sequences=s["live_sequences"], batches=s["batches"],
                                    batched_calls=s["batched_calls"], pid=s["pid"],
                                    kv_tokens_used=s["kv_tokens_used"],
                                    kv_tokens_total=s["kv_tokens_total"], dtype=s["dtype"],
                                    dtype_choice=s["dtype_choice"],
                                    cost_coefficients=s["cost_coefficients"],
                                    mean_batch_rows=s["mean_batch_rows"],
                                    busy_fraction=s["busy_fraction"],
                                    active_sequences=s["active_sequences"])
                    for side in found for s in sorted(side, key=lambda s: s["replica"])]
        return pb.StatsResponse(replicas=replicas, router_inflight=self._inflight,
                                router_replica=serve_replica_name("router"),
                                router_pid=os.getpid())

    # -- grpc.health.v1.Health (what Kubernetes gRPC probes and grpc_health_probe call) -------
    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context) -> health_pb2.HealthCheckResponse:
        try:
            self._check_peer(grpc_context)
            if request.service not in HEALTH_SERVICES:
                raise errors.NotFoundError("service", f"unknown service {request.service!r}; "
                                           f"known: {', '.join(map(repr, HEALTH_SERVICES))}")
        except Exception as exc:  # noqa: BLE001
            errors.set_status(grpc_context, exc)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=await self._health_status())

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (checked every HEALTH_WATCH_PERIOD_S) until the client
        goes away. An unknown service gets SERVICE_UNKNOWN and the call stays open (the spec)."""
        try:
            self._check_peer(grpc_context)
        except Exception as exc:  # noqa: BLE001
            raise errors.set_status(grpc_context, exc) from None
        last = None
        while True:
            status = (await self._health_status() if request.service in HEALTH_SERVICES
                      else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_PERIOD_S)

    async def _health_status(self) -> int:
        serving, _, _ = await self._serving()
        return (health_pb2.HealthCheckResponse.SERVING if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _serving(self) -> tuple[bool, str, tuple[dict, dict]]:
        """Whether a drafter and a verifier replica answer (within 10 s), why not, and their
        stats (drafter, verifier)."""
        try:
            draft, target = await asyncio.wait_for(asyncio.gather(
                self._call(self._drafter, "stats"), self._call(self._verifier, "stats")), 10)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return False, errors.status_for(exc)[1], ({}, {})
        return True, "serving", (draft, target)

    async def rpc_floor(self, calls: int = 200) -> dict[str, float]:
        """Round trips (ms) timed in this replica: an empty data-path call to a verifier engine
        over the path the rounds use (p50, p99), and an empty Serve call to a verifier replica
        (median) for comparison; bench.measure."""
        session = await Session.open(self._verifier, f"bench-floor-{uuid.uuid4().hex}",
                                     self._node_id)
        try:
            data = [await _timed(session.call("ping")) for _ in range(calls + 1)][1:]
        finally:
            await session.close(release=True)
        handle = self._verifier.options(method_name="stats")
        serve_calls = [await _timed(handle.remote()) for _ in range(calls // 4 + 1)][1:]
        data.sort()
        serve_calls.sort()
        return {"median_ms": data[len(data) // 2], "p99_ms": data[int(len(data) * 0.99)],
                "serve_call_median_ms": serve_calls[len(serve_calls) // 2], "calls": calls,
                "path": session.client.address.split(":")[0]}

    # -- helpers -----------------------------------------------------------------------------
    async def _deltas(self, message: pb.GenerateRequest | RequestFields,
                      validated: list | None = None) -> AsyncIterator[Delta]:
        """Admission, validation and the loop, with metrics; raises on any failure. Both doors
        call it (after their peer check) with what they received; the validated
        GenerationRequest is appended to `validated` when given (HTTP reports prompt tokens)."""
        if self._inflight >= self.config.router_queue_cap:
            raise errors.QueueFullError(f"router has {self._inflight} requests in flight "
                                        f"(router_queue_cap={self.config.router_queue_cap})")
        self._inflight += 1
        self._metrics.inflight.set(self._inflight)
        mode, status, stats, num_tokens = "invalid", "error", None, 0
        try:
            request = to_generation_request(message, request_id=uuid.uuid4().hex,
                                            tokenizer=self.tokenizer, limits=self.limits)
            mode = request.mode.name.lower()
            if validated is not None:
                validated.append(request)
            retry = dict(attempts=self.config.replica_retry_attempts,
                         backoff_s=self.config.replica_retry_backoff_s, node_id=self._node_id)
            drafter = RemoteDrafter(self._drafter, request.request_id, **retry)
            verifier = RemoteVerifier(self._verifier, request.request_id, **retry)
            last = time.perf_counter()
            deadline = time.monotonic() + self.config.request_timeout_s
            async with contextlib.aclosing(generate(request, drafter, verifier, self.tokenizer,
                                                    self._controller)) as deltas:
                async for delta in within(deltas, deadline):
                    now = time.perf_counter()
                    self._metrics.round(mode, (now - last) * 1000, len(delta.token_ids))
                    last, stats = now, delta.stats
                    num_tokens += len(delta.token_ids)
                    yield delta
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:
            status = errors.status_for(exc)[0].name.lower()
            raise
        finally:
            self._inflight -= 1
            self._metrics.inflight.set(self._inflight)
            self._metrics.finished(mode, status, stats, num_tokens)

    def _check_peer(self, grpc_context) -> None:
        self._check_client(is_loopback_peer(grpc_context.peer()))

    def _check_client(self, is_loopback: bool) -> None:
        if self.config.is_loopback and not is_loopback:
            raise errors.PeerNotAllowedError(
                f"this service accepts loopback clients only (host={self.config.host})")

    @staticmethod
    async def _call(handle, method: str, *args):
        return await handle.options(method_name=method).remote(*args)

    async def _every_replica(self, handle, max_probes: int = 64) -> list[dict]:
        """`stats` of every replica of a deployment: Serve's router spreads the probes over the
        replicas; stop once as many answered as the deployment reports running (its world size)."""
        seen: dict[str, dict] = {}
        expected = 1
        for _ in range(max_probes):
            answer = await self._call(handle, "stats")
            seen[answer["replica"]] = answer
            expected = max(expected, answer["world_size"])
            if len(seen) >= expected:
                break
        return list(seen.values())
