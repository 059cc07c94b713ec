"""The OpenAI-compatible HTTP door: GET /v1/models, POST /v1/completions, /v1/chat/completions.

`OpenAIRouter` is the Router with FastAPI routes and `RouterIngress` that class through
`serve.ingress`, the deployment serve.app runs: one replica serves both doors, and an HTTP request
costs no extra Serve hop (README, "Front doors"). The decoration runs at import, in the driver and
again in each replica, as Serve needs (it rewrites the methods' signatures in the process).
A body becomes `RequestFields` (serve.request) and goes through the same validation, admission and
loop as a gRPC request (`Router._deltas`); every failure is answered by `errors.openai_error`.
Conventions: REFERENCE.md §12. speccascade's own fields (`mode`, `num_draft_tokens`, ...) ride in
the body, where the `openai` client puts `extra_body`; speculation stats come back as `speccascade`.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from speccascade.engine.loop import Delta, Mode
from speccascade.engine.seam import RequestStats
from speccascade.sampling import DeferralRule, ParamError
from speccascade.serve import errors
from speccascade.serve.request import RequestFields
from speccascade.serve.router import Router, is_loopback_host, stats_message

DEFAULT_MAX_TOKENS = 16       # OpenAI's default for completions
DEFAULT_TEMPERATURE = 1.0     # OpenAI's default: sampled unless the client asks for 0
FINISH = {"length": "length", "stop": "stop", "eos": "stop"}


# -- request bodies ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 400, not silently ignored


class StreamOptions(_Strict):
    include_usage: bool = False


class _Body(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None   # accepted and unused, as OpenAI's own servers treat it
    # speccascade's fields (the openai client's extra_body); names as in GenerateRequest
    mode: str | int | None = None
    num_draft_tokens: int = 0
    deferral_rule: str | int | None = None
    deferral_threshold: float | None = None
    pipelined: bool | None = None
    top_k: int = 0
    adaptive_num_draft_tokens: bool = False
    draft_stop_below: float = 0.0
    # sampling baselines (README "Front doors"): vLLM's `min_p`; `eta` (η-sampling) and `lenience`
    # (lossy speculative decoding) are GenerateRequest's names
    min_p: float | None = None
    eta: float | None = None
    lenience: float | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens


# HTTP field names of GenerateRequest fields that differ; validation names the proto field.
COMPLETION_NAMES = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt"}
CHAT_NAMES = {"max_new_tokens": "max_tokens", "prompt_token_ids": "messages"}


def _enum(name: str, value, enum) -> int:
    if value is None or isinstance(value, int):
        return value or 0
    try:
        return enum[value.upper()].value
    except KeyError:
        names = ", ".join(m.name for m in enum)
        raise ParamError(name, f"{name} must be one of {names}, got {value!r}") from None


def _parse(raw: bytes, model: type[_Body]) -> _Body:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ParamError("request", f"request body is not valid UTF-8 JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "request"
        where = ".".join(map(str, first["loc"])) or "request"
        raise ParamError(field, f"{where}: {first['msg']}") from None


def _fields(body: _Body, size: int, prompt: dict) -> RequestFields:
    """The body as GenerateRequest fields; `prompt` is {"prompt": text} or {"prompt_token_ids"}."""
    if body.n != 1:
        raise ParamError("n", f"n must be 1 (one choice per request), got {body.n}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    max_tokens = getattr(body, "max_completion_tokens", None)
    max_tokens = body.max_tokens if max_tokens is None else max_tokens
    return RequestFields(
        **prompt, max_new_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        mode=_enum("mode", body.mode, Mode),
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        num_draft_tokens=body.num_draft_tokens,
        deferral_rule=_enum("deferral_rule", body.deferral_rule, DeferralRule),
        deferral_threshold=body.deferral_threshold, stop=tuple(stop), pipelined=body.pipelined,
        adaptive_num_draft_tokens=body.adaptive_num_draft_tokens,
        draft_stop_below=body.draft_stop_below, min_p=body.min_p or 0.0, eta=body.eta or 0.0,
        lenience=body.lenience, size=size)


def _renamed(exc: Exception, names: dict[str, str]) -> Exception:
    """A ParamError naming the HTTP field instead of the GenerateRequest one."""
    field = getattr(exc, "field", None)
    if not isinstance(exc, ValueError) or not field:
        return exc
    message = getattr(exc, "message", None) or str(exc)
    for old, new in names.items():
        message = re.sub(rf"\b{old}\b", new, message)
    return ParamError(names.get(field, field), message)


def _error(exc: Exception, names: dict[str, str]) -> JSONResponse:
    status, body = errors.openai_error(_renamed(exc, names))
    return JSONResponse(body, status_code=status)


def stats_dict(stats: RequestStats) -> dict[str, Any]:
    """The speculation stats: every field of the gRPC door's GenerationStats, by its name."""
    message = stats_message(stats)
    return {f.name: list(getattr(message, f.name)) if f.is_repeated else getattr(message, f.name)
            for f in message.DESCRIPTOR.fields}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _ClosingStream(StreamingResponse):
    """An SSE response that closes the generation when it ends in any way: finished, or the
    client gone (Starlette cancels the response; the loop's release then frees the KV entries),
    or never started at all."""

    def __init__(self, content, deltas):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._deltas = deltas

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._deltas.aclose()


api = FastAPI(title="speccascade", description="OpenAI-compatible API of speccascade",
              docs_url=None, redoc_url=None, openapi_url=None)


class OpenAIRouter(Router):
    """The Router, with the OpenAI-compatible routes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_id = self.config.served_model_name
        self.created = int(time.time())

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_client(is_loopback_host(request.client and request.client.host))
        except Exception as exc:  # noqa: BLE001
            return _error(exc, {})
        target, draft = self.config.model_paths()
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created,
            "owned_by": "speccascade", "max_model_len": self.limits.max_seq_len,
            "speccascade": {"target": target.name, "draft": draft.name}}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # -- the shared path -------------------------------------------------------------------
    async def _serve(self, request: Request, *, chat: bool):
        names = CHAT_NAMES if chat else COMPLETION_NAMES
        try:
            self._check_client(is_loopback_host(request.client and request.client.host))
            raw = await request.body()
            if len(raw) > self.limits.max_message_bytes:  # before parsing it
                raise ParamError("request", f"request is {len(raw)} bytes; at most "
                                 f"{self.limits.max_message_bytes} are allowed")
            body = _parse(raw, ChatBody if chat else CompletionBody)
            if body.model is not None and body.model != self.model_id:
                raise errors.NotFoundError("model", f"model {body.model!r} is not served here; "
                                           f"GET /v1/models lists {self.model_id!r}")
            prompt = (chat_prompt(self.tokenizer, body.messages) if chat
                      else _completion_prompt(body))
            fields = _fields(body, len(raw), prompt)
            validated: list = []
            deltas = self._deltas(fields, validated)
            # Validation, admission and the first round before any byte is sent, so that every
            # rejection has its HTTP status, streamed or not.
            first = await anext(deltas)
        except Exception as exc:  # noqa: BLE001 - every failure gets an explicit status
            return _error(exc, names)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": self.model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _ClosingStream(_events(first, deltas, meta, chat, include_usage, names,
                                          len(validated[0].prompt_ids)), deltas)
        async with contextlib.aclosing(deltas):
            parts, last = [first], first
            try:
                while last.finish_reason is None:
                    last = await anext(deltas)
                    parts.append(last)
            except Exception as exc:  # noqa: BLE001
                return _error(exc, names)
        text = "".join(p.text for p in parts)
        choice = ({"message": {"role": "assistant", "content": text}} if chat
                  else {"text": text, "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion",
                "choices": [{"index": 0, **choice, "finish_reason": FINISH[last.finish_reason]}],
                "usage": _usage(len(validated[0].prompt_ids), parts),
                "speccascade": stats_dict(last.stats)}

def chat_prompt(tokenizer, messages: list[ChatMessage]) -> dict:
    """{"prompt_token_ids": ...}: the messages through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ParamError("messages", "this model's tokenizer has no chat template, so chat "
                         "messages cannot be formatted; use /v1/completions with a prompt")
    if not messages:
        raise ParamError("messages", "messages is empty")
    plain = [{"role": m.role, "content": m.content if isinstance(m.content, str)
              else "".join(part.text for part in m.content)} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    # The template writes its special tokens as text: tokenize without adding more.
    return {"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}


def _completion_prompt(body: CompletionBody) -> dict:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ParamError("prompt", f"one prompt per request, got a list of {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return {"prompt_token_ids": prompt}
    return {"prompt": prompt or ""}


def _usage(prompt_tokens: int, parts: list[Delta]) -> dict:
    completion = sum(len(p.token_ids) for p in parts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


async def _events(first: Delta, deltas: AsyncIterator[Delta], meta: dict, chat: bool,
                  include_usage: bool, names: dict, prompt_tokens: int) -> AsyncIterator[str]:
    """Server-sent events: one chunk per round, then `data: [DONE]`. A failure after the first
    chunk (the status is already 200) is sent as an OpenAI error event before [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    delta, parts = first, [first]
    try:
        while True:
            done = delta.finish_reason is not None
            if chat:
                choice = {"delta": ({"role": "assistant"} if delta is first else {})
                          | {"content": delta.text}}
            else:
                choice = {"text": delta.text, "logprobs": None}
            chunk = {**meta, "object": kind, "choices": [
                {"index": 0, **choice, "finish_reason": FINISH[delta.finish_reason]
                 if done else None}]}
            if done:
                chunk["speccascade"] = stats_dict(delta.stats)
            yield _sse(chunk)
            if done:
                break
            delta = await anext(deltas)
            parts.append(delta)
        if include_usage:
            yield _sse({**meta, "object": kind, "choices": [],
                        "usage": _usage(prompt_tokens, parts)})
    except Exception as exc:  # noqa: BLE001
        yield _sse(errors.openai_error(_renamed(exc, names))[1])
    yield _sse("[DONE]")


RouterIngress = serve.ingress(api)(OpenAIRouter)
