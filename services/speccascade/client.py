"""SpecCascadeClient: a small Python client for the speccascade gRPC service.

    client = SpecCascadeClient("127.0.0.1:9000")
    reply = client.generate("def add(a, b):", max_new_tokens=32, mode="speculative")
    for part in client.generate_stream("import os", max_new_tokens=64, mode="cascade",
                                       deferral_rule="chow", deferral_threshold=0.1):
        print(part.text, end="", flush=True)

Keyword arguments are the fields of `GenerateRequest`; `mode`, `deferral_rule` take enum names
(case-insensitive) or numbers. For `deferral_threshold` (the cascade's α), README.md "Choosing α"
lists per rule the α whose quality stays within 1 % of TARGET, and the speed it buys.
The lossy baselines cascades are compared with are request options too (README "Sampling
options"): `lenience` (SPECULATIVE only, in (0, 1]: accept a draft with min(1, p/(lenience·q))),
and truncation sampling of the target, verified losslessly, `min_p` and `eta` (TARGET or
SPECULATIVE, each in [0, 1), 0 = off):

    client.generate("def f(x):", mode="speculative", temperature=0.8, min_p=0.1)
    client.generate("def f(x):", mode="speculative", temperature=0.8, lenience=0.5)

gRPC errors surface as `grpc.RpcError` with the server's status (INVALID_ARGUMENT naming the field
for a value out of range or an option the mode does not take).
"""
from __future__ import annotations

from typing import Iterator

import grpc

from speccascade.v1 import generation_pb2 as pb
from speccascade.v1 import generation_pb2_grpc as pb_grpc

_ENUMS = {"mode": pb.Mode, "deferral_rule": pb.DeferralRule}


def make_request(prompt: str | list[int] | None = None, **fields) -> pb.GenerateRequest:
    """A GenerateRequest; `prompt` may be text or token ids. None-valued fields stay unset."""
    fields = {k: v for k, v in fields.items() if v is not None}
    for name, enum in _ENUMS.items():
        if isinstance(fields.get(name), str):
            fields[name] = enum.Value(fields[name].upper())
    if isinstance(prompt, str):
        fields["prompt"] = prompt
    elif prompt is not None:
        fields["prompt_token_ids"] = list(prompt)
    return pb.GenerateRequest(**fields)


class SpecCascadeClient:
    def __init__(self, address: str = "127.0.0.1:9000", *, timeout: float | None = None,
                 application: str | None = None):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.timeout = timeout
        # Serve picks the application by this metadata key; optional with one application.
        self.metadata = (("application", application),) if application else None

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self.metadata}

    def generate(self, prompt=None, *, timeout: float | None = None,
                 **fields) -> pb.GenerateResponse:
        return self.stub.Generate(make_request(prompt, **fields), **self._kw(timeout))

    def generate_stream(self, prompt=None, *, timeout: float | None = None,
                        **fields) -> Iterator[pb.GenerateStreamResponse]:
        """Messages as they arrive; cancel early with `.cancel()` on the returned iterator."""
        return self.stub.GenerateStream(make_request(prompt, **fields), **self._kw(timeout))

    def health(self, timeout: float | None = 10) -> pb.HealthResponse:
        return self.stub.Health(pb.HealthRequest(), **self._kw(timeout))

    def stats(self, timeout: float | None = 30) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), **self._kw(timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SpecCascadeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
