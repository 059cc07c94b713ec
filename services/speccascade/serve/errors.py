"""The one place that maps exceptions to gRPC status codes, and those to HTTP statuses.

Serve turns an unhandled exception into INTERNAL with a stack trace, so the router catches every
exception of a request, asks `status_for` for its code and a client-safe message, and sets them on
the `RayServegRPCContext`. Exceptions raised inside a drafter/verifier replica arrive wrapped in a
`RayTaskError` that is also an instance of the original class, so the isinstance checks below see
through the hop. The HTTP door (serve.http) answers with the HTTP status matching the gRPC code
(`HTTP_STATUS`) and OpenAI's error body (`openai_error`).
"""
from __future__ import annotations

import asyncio

import grpc
from ray.exceptions import GetTimeoutError, RayActorError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                  ReplicaUnavailableError)

from speccascade.models.runner import CapacityError


class QueueFullError(RuntimeError):
    """The router replica already has `router_queue_cap` requests in flight."""


class PeerNotAllowedError(PermissionError):
    """The service is configured for loopback clients only and the peer is not one."""


class ReplicaFailedError(RuntimeError):
    """A drafter/verifier call kept failing because its replicas died (retries exhausted)."""


class NotFoundError(LookupError):
    """A name the service does not serve: a model id (HTTP) or a health service name (gRPC)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class RpcAborted(Exception):
    """Ends a failed stream after its status was set. Serve pickles the exception a stream ends
    with to its proxy; this one always unpickles (one plain argument), unlike some it replaces."""


def _message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError: the replica's original exception
    text = str(cause if isinstance(cause, BaseException) else exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, details) for an exception raised while serving a request."""
    field = getattr(exc, "field", None)
    if isinstance(exc, ValueError) and field:  # ParamError, ContextLengthError, request checks
        message = getattr(exc, "message", None) or _message(exc)
        return grpc.StatusCode.INVALID_ARGUMENT, (message if field in message
                                                  else f"{field}: {message}")
    if isinstance(exc, (CapacityError, QueueFullError, BackPressureError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _message(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, GetTimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError,
                        ReplicaFailedError)):
        return grpc.StatusCode.UNAVAILABLE, f"a model replica is unavailable: {_message(exc)}"
    if isinstance(exc, PeerNotAllowedError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    # A bug: say what kind without leaking a stack trace to the client (it is in the logs).
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def set_status(grpc_context, exc: BaseException) -> RpcAborted:
    """Set the status for `exc` on a RayServegRPCContext (ray.serve.grpc_util); return the
    exception a streaming method raises to end with that status."""
    code, details = status_for(exc)
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    return RpcAborted(f"{code.name}: {details}")


# gRPC code -> (HTTP status, OpenAI error type). vLLM and OpenAI answer the same statuses.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.INTERNAL: (500, "internal_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def openai_error(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, body) for `exc`: OpenAI's {"error": {"message", "type", "param", "code"}}.
    `param` names the offending field; `code` is the gRPC status name the other door answers."""
    code, details = status_for(exc)
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    param = getattr(exc, "field", None) if code in (grpc.StatusCode.INVALID_ARGUMENT,
                                                      grpc.StatusCode.NOT_FOUND) else None
    return status, {"error": {"message": details, "type": kind, "param": param,
                              "code": code.name.lower()}}
