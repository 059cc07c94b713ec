"""The in-process engine: a draft/target pair and the shared loop, no Ray.

    engine = Engine.from_paths(target_dir, draft_dir)          # or Engine.default()
    results = engine.generate([GenerationRequest(...), ...])   # several requests, batched
"""
from __future__ import annotations

import asyncio

import torch

from speccascade.engine.controller import SpeculationController
from speccascade.engine.local import LocalDrafter, LocalVerifier
from speccascade.engine.loop import Delta, GenerationRequest, generate_all
from speccascade.engine.workers import DraftWorker, VerifyWorker
from speccascade.models.loader import default_pair_paths, load_pair


class Engine:
    def __init__(self, target_model, draft_model, tokenizer, *, max_live_seqs: int = 64,
                 max_seq_len: int | None = None):
        """`max_live_seqs` KV slots of `max_seq_len` tokens each (None: the runner's default)."""
        self.tokenizer = tokenizer
        kv = dict(max_live_seqs=max_live_seqs, max_seq_len=max_seq_len)
        self.drafter = LocalDrafter(DraftWorker(draft_model, **kv))
        self.verifier = LocalVerifier(VerifyWorker(target_model, **kv))
        self.max_seq_len = min(self.verifier.worker.runner.max_seq_len,
                               self.drafter.worker.runner.max_seq_len)
        self.controller = SpeculationController()  # traffic priors shared by this engine's requests

    @classmethod
    def from_paths(cls, target_path, draft_path, *, dtype: str = "float32", device: str = "cpu",
                   threads: int | None = None, **kwargs) -> "Engine":
        if threads:
            torch.set_num_threads(threads)
        target, draft, tokenizer = load_pair(target_path, draft_path, dtype, device)
        return cls(target, draft, tokenizer, **kwargs)

    @classmethod
    def default(cls, **kwargs) -> "Engine":
        return cls.from_paths(*default_pair_paths(), **kwargs)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def request(self, prompt: str | list[int], request_id: str = "0", **fields) -> GenerationRequest:
        """A GenerationRequest with this model's EOS and context filled in."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        eos = self.tokenizer.eos_token_id
        return GenerationRequest(request_id=request_id, prompt_ids=ids,
                                 eos_token_ids=frozenset() if eos is None else frozenset([eos]),
                                 max_seq_len=self.max_seq_len, **fields)

    def generate(self, requests: list[GenerationRequest]) -> list[Delta]:
        """Run all requests concurrently (they share forwards); one final Delta each."""
        async def run():
            return await asyncio.gather(*(generate_all(r, self.drafter, self.verifier,
                                                       self.tokenizer, self.controller)
                                          for r in requests))
        return asyncio.run(run())
