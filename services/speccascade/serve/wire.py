"""The data path's wire format: what crosses a ZMQ socket between a router and an engine process.

One `Call` per message, one `Reply` per call, both msgspec msgpack (what vLLM V1 and SGLang use:
~1 µs to encode a round's request, against ~100 µs for a pickled torch tensor). The seam's
dataclasses travel as they are; tensors (a SparseDraft's q′) as one msgpack extension each, raw
bytes plus dtype and shape. Messages are small (a round ships a few KB), so there is no zero-copy
framing: it pays only above ~10–100 kB.

Authentication: ZMQ itself has none, so every call carries a token. A session token is
HMAC-SHA256(engine secret, seq_id): the replica hands it to the router when it opens a session for
that sequence (over Serve, which is authenticated by the Ray cluster), and the engine checks it on
every call. A token opens one sequence only; control calls (stats, ping) need the token of
CONTROL_SEQ, which only the replica that spawned the engine can compute.

The seam's types (and torch) are imported on the first typed decode: a replica's front end only
reads control replies (`decode_control_reply`) and starts without torch.
"""
from __future__ import annotations

import functools
import hashlib
import hmac

import msgspec

CONTROL_SEQ = "__control__"       # the seq_id of calls that are not about a sequence
_TENSOR = 1                        # msgpack extension code of a torch tensor


class Call(msgspec.Struct, array_like=True):
    kind: str                      # "draft" | "verify" | "release" | "stats" | "ping"
    id: int                        # echoed in the reply (calls of one socket are multiplexed)
    seq_id: str
    token: bytes
    draft: DraftRequest | None = None
    verify: VerifyRequest | None = None


class Reply(msgspec.Struct, array_like=True):
    id: int
    draft: DraftResult | None = None
    verify: VerifyResult | None = None
    info: dict | None = None                 # stats, ping
    error: str | None = None                 # the exception's class name (EngineCallError.kind)
    message: str = ""
    field: str | None = None                 # a ParamError's / ContextLengthError's field


class ControlReply(msgspec.Struct, array_like=True):
    """A Reply read without its model payloads (a front end's control calls)."""
    id: int
    draft: msgspec.Raw
    verify: msgspec.Raw
    info: dict | None = None
    error: str | None = None
    message: str = ""
    field: str | None = None


class SessionInfo(msgspec.Struct):
    """What a replica's session yields first: how to reach its engine for one sequence."""
    replica: str                   # the Serve replica id (stats, fail-over logs)
    node_id: str                   # Ray node of the engine: ipc works only on the same node
    ipc: str                       # ipc://… address
    tcp: str                       # tcp://<node ip>:<port> address
    token: bytes


def session_token(secret: bytes, seq_id: str) -> bytes:
    return hmac.digest(secret, seq_id.encode(), hashlib.sha256)


def token_ok(secret: bytes, seq_id: str, token: bytes) -> bool:
    return hmac.compare_digest(session_token(secret, seq_id), token)


def _enc_hook(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        head = msgspec.msgpack.encode((str(t.dtype).removeprefix("torch."), list(t.shape)))
        return msgspec.msgpack.Ext(_TENSOR, bytes([len(head)]) + head + t.numpy().tobytes())
    raise NotImplementedError(f"cannot send {type(obj).__name__} on the data path")


def _ext_hook(code: int, data: memoryview):
    if code != _TENSOR:
        raise NotImplementedError(f"unknown extension {code}")
    import torch

    n = data[0]
    dtype, shape = msgspec.msgpack.decode(data[1:1 + n])
    body = bytearray(data[1 + n:])  # a copy the tensor owns (the frame is reused by ZMQ)
    dtype = getattr(torch, dtype)
    return (torch.frombuffer(body, dtype=dtype) if body else torch.empty(0, dtype=dtype)).view(shape)


def _dec_hook(kind, obj):
    import torch

    if kind is torch.Tensor and isinstance(obj, torch.Tensor):
        return obj
    raise NotImplementedError(f"cannot decode {kind}")


@functools.cache
def _typed(kind: type) -> msgspec.msgpack.Decoder:
    # msgspec resolves Call's and Reply's annotations in this module's namespace.
    from speccascade.engine import seam

    globals().update(DraftRequest=seam.DraftRequest, DraftResult=seam.DraftResult,
                     VerifyRequest=seam.VerifyRequest, VerifyResult=seam.VerifyResult)
    return msgspec.msgpack.Decoder(kind, ext_hook=_ext_hook, dec_hook=_dec_hook)


def decode_call(frame) -> Call:
    return _typed(Call).decode(frame)


def decode_reply(frame) -> Reply:
    return _typed(Reply).decode(frame)


encode = msgspec.msgpack.Encoder(enc_hook=_enc_hook).encode
decode_control_reply = msgspec.msgpack.Decoder(ControlReply).decode
