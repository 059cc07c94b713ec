"""A request from either front door -> engine GenerationRequest: every field is checked here, once.

Both doors first put what they received into `RequestFields` (the GenerateRequest fields, None where
unset): the gRPC door with `RequestFields.from_proto`, the HTTP door (serve.http) from the OpenAI
body. `to_generation_request` then checks them, so both doors accept and reject the same requests.
Each violation raises `ParamError(field, message)` naming the field and its allowed range;
`errors.status_for` answers it with INVALID_ARGUMENT (HTTP 400). The sampling and cascade objects
validate their own ranges (speccascade.sampling), and GenerationRequest which modes may set
lenience, min_p and eta (engine.loop), so those rules are not repeated here.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from speccascade.engine.loop import GenerationRequest, Mode
from speccascade.engine.seam import DEFAULT_DRAFT_AHEAD_WASTE_COST, DEFAULT_DRAFT_TOP_K
from speccascade.sampling import (CascadeParams, DeferralRule, ParamError, SamplingParams,
                                  validate_num_draft_tokens)
from speccascade.serve.config import ServiceConfig
from speccascade.serve.ingress import Undecodable
from speccascade.v1 import generation_pb2 as pb

INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_seq_len: int                # model context (the smaller of target and draft)
    max_new_tokens: int
    max_prompt_tokens: int
    default_num_draft_tokens: int | None   # None: the controller chooses γ
    max_num_draft_tokens: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_message_bytes: int
    draft_top_k: int = DEFAULT_DRAFT_TOP_K
    draft_ahead_waste_cost: float = DEFAULT_DRAFT_AHEAD_WASTE_COST

    @classmethod
    def from_config(cls, config: ServiceConfig, *, vocab_size: int, max_seq_len: int) -> "Limits":
        return cls(vocab_size=vocab_size, max_seq_len=max_seq_len,
                   max_new_tokens=config.max_new_tokens,
                   max_prompt_tokens=min(config.max_prompt_tokens, max_seq_len - 1),
                   default_num_draft_tokens=config.default_num_draft_tokens,
                   max_num_draft_tokens=config.max_num_draft_tokens,
                   max_stop_strings=config.max_stop_strings,
                   max_stop_string_chars=config.max_stop_string_chars,
                   max_message_bytes=config.max_message_bytes,
                   draft_top_k=config.draft_top_k,
                   draft_ahead_waste_cost=config.draft_ahead_waste_cost)


@dataclass(frozen=True)
class RequestFields:
    """A request as a front door received it, before any check: GenerateRequest's fields, with
    None for the optional ones left unset. `size` is the request's size in bytes as received."""
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    mode: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    num_draft_tokens: int = 0
    deferral_rule: int = 0
    deferral_threshold: float | None = None
    stop: tuple[str, ...] = ()
    pipelined: bool | None = None
    adaptive_num_draft_tokens: bool = False
    draft_stop_below: float = 0.0
    lenience: float | None = None
    min_p: float = 0.0
    eta: float = 0.0
    size: int = 0

    @classmethod
    def from_proto(cls, msg: pb.GenerateRequest) -> "RequestFields":
        def optional(name):
            return getattr(msg, name) if msg.HasField(name) else None

        return cls(prompt=msg.prompt, prompt_token_ids=list(msg.prompt_token_ids),
                   max_new_tokens=msg.max_new_tokens, mode=msg.mode,
                   temperature=msg.temperature, top_p=optional("top_p"), top_k=msg.top_k,
                   seed=optional("seed"), num_draft_tokens=msg.num_draft_tokens,
                   deferral_rule=msg.deferral_rule,
                   deferral_threshold=optional("deferral_threshold"), stop=tuple(msg.stop),
                   pipelined=optional("pipelined"),
                   adaptive_num_draft_tokens=msg.adaptive_num_draft_tokens,
                   draft_stop_below=msg.draft_stop_below, lenience=optional("lenience"),
                   min_p=msg.min_p, eta=msg.eta, size=msg.ByteSize())


def _int(name: str, value) -> int:
    # JSON bodies may carry any number; the proto carries int32.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {value!r}")
    return value


def _prompt_ids(msg: RequestFields, tokenizer, limits: Limits) -> list[int]:
    if msg.prompt and msg.prompt_token_ids:
        raise ParamError("prompt", "set either prompt or prompt_token_ids, not both")
    if msg.prompt:
        ids = tokenizer(msg.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ParamError("prompt", "prompt tokenizes to no tokens")
    elif msg.prompt_token_ids:
        ids = [_int("prompt_token_ids", t) for t in msg.prompt_token_ids]
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise ParamError("prompt_token_ids", f"prompt_token_ids must be in "
                             f"[0, {limits.vocab_size}) (the vocabulary), got {bad}")
    else:
        raise ParamError("prompt", "prompt is empty: set prompt or prompt_token_ids")
    if len(ids) > limits.max_prompt_tokens:
        field = "prompt" if msg.prompt else "prompt_token_ids"
        raise ParamError(field, f"{field} has {len(ids)} tokens; at most "
                         f"{limits.max_prompt_tokens} are allowed")
    return ids


def _mode(msg: RequestFields) -> Mode:
    if msg.mode == pb.MODE_UNSPECIFIED:
        return Mode.SPECULATIVE
    try:
        return Mode(msg.mode)
    except ValueError:
        names = ", ".join(m.name for m in Mode)
        raise ParamError("mode", f"mode must be one of {names}, got {msg.mode}") from None


def _cascade(msg: RequestFields, mode: Mode) -> CascadeParams | None:
    has_alpha = msg.deferral_threshold is not None
    if mode != Mode.CASCADE:
        if msg.deferral_rule != pb.DEFERRAL_RULE_UNSPECIFIED or has_alpha:
            field = "deferral_rule" if msg.deferral_rule else "deferral_threshold"
            raise ParamError(field, f"{field} applies to mode CASCADE only")
        return None
    if msg.deferral_rule == pb.DEFERRAL_RULE_UNSPECIFIED:
        names = ", ".join(r.name for r in DeferralRule)
        raise ParamError("deferral_rule", f"mode CASCADE needs deferral_rule, one of {names}")
    if not has_alpha:
        raise ParamError("deferral_threshold", "mode CASCADE needs deferral_threshold (alpha)")
    return CascadeParams(msg.deferral_rule, msg.deferral_threshold)  # checks rule and α range


def _stop(msg: RequestFields, limits: Limits) -> tuple[str, ...]:
    if len(msg.stop) > limits.max_stop_strings:
        raise ParamError("stop", f"at most {limits.max_stop_strings} stop strings are allowed, "
                         f"got {len(msg.stop)}")
    for s in msg.stop:
        if not isinstance(s, str) or not s or len(s) > limits.max_stop_string_chars:
            raise ParamError("stop", f"each stop string must have 1 to "
                             f"{limits.max_stop_string_chars} characters, got {s!r:.40}")
    return tuple(msg.stop)


def to_generation_request(msg: RequestFields | pb.GenerateRequest | Undecodable, *,
                          request_id: str, tokenizer, limits: Limits) -> GenerationRequest:
    if isinstance(msg, pb.GenerateRequest):
        msg = RequestFields.from_proto(msg)
    if msg.size > limits.max_message_bytes:
        raise ParamError("request", f"request is {msg.size} bytes; at most "
                         f"{limits.max_message_bytes} are allowed")
    if isinstance(msg, Undecodable):  # the proxy could not parse it (serve.ingress)
        raise ParamError(msg.field, msg.reason)
    prompt_ids = _prompt_ids(msg, tokenizer, limits)
    for name in ("max_new_tokens", "mode", "top_k", "num_draft_tokens", "deferral_rule"):
        _int(name, getattr(msg, name))
    if not 1 <= msg.max_new_tokens <= limits.max_new_tokens:
        raise ParamError("max_new_tokens", f"max_new_tokens must be in "
                         f"[1, {limits.max_new_tokens}], got {msg.max_new_tokens}")
    mode = _mode(msg)
    gamma = msg.num_draft_tokens or limits.default_num_draft_tokens  # None: the controller's
    if gamma is not None:
        validate_num_draft_tokens(gamma, limits.max_num_draft_tokens)
    if not (isinstance(msg.draft_stop_below, (int, float)) and math.isfinite(msg.draft_stop_below)
            and 0 <= msg.draft_stop_below < 1):
        raise ParamError("draft_stop_below", f"draft_stop_below must be in [0, 1), got "
                         f"{msg.draft_stop_below}")
    if isinstance(msg.temperature, (int, float)) and not math.isfinite(msg.temperature):
        # SamplingParams checks too; this message names a proto float32 the same way
        raise ParamError("temperature", f"temperature must be finite, got {msg.temperature}")
    # An unset seed is drawn here, once: every replica (and a fail-over replica) then draws the
    # same random numbers for this request.
    seed = secrets.randbits(63) if msg.seed is None else _int("seed", msg.seed)
    if not 0 <= seed < 1 << 64:  # the proto's uint64
        raise ParamError("seed", f"seed must be in [0, 2^64), got {seed}")
    sampling = SamplingParams(temperature=msg.temperature, top_k=msg.top_k,
                              top_p=1.0 if msg.top_p is None else msg.top_p, seed=seed,
                              min_p=msg.min_p, eta=msg.eta,
                              lenience=1.0 if msg.lenience is None else msg.lenience)
    eos = tokenizer.eos_token_id
    return GenerationRequest(
        request_id=request_id, prompt_ids=prompt_ids, max_new_tokens=msg.max_new_tokens,
        mode=mode, sampling=sampling, num_draft_tokens=gamma, cascade=_cascade(msg, mode),
        stop=_stop(msg, limits), eos_token_ids=frozenset() if eos is None else frozenset([eos]),
        pipelined=None if msg.pipelined is None else bool(msg.pipelined),
        adaptive=msg.adaptive_num_draft_tokens, max_num_draft_tokens=limits.max_num_draft_tokens,
        draft_stop_below=float(msg.draft_stop_below), max_seq_len=limits.max_seq_len,
        draft_top_k=limits.draft_top_k, draft_ahead_waste_cost=limits.draft_ahead_waste_cost)
