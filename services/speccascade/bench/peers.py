"""In-process references: our engine, a sequential token-level cascade, the target's log-likelihood."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from speccascade.engine.transcript import Transcript
from speccascade.models.runner import ModelRunner


def engine_generate(engine, prompts: list[list[int]], new_tokens: int, progress=None,
                    **fields) -> dict:
    """Our in-process engine, one request at a time (single stream)."""
    tokens, seconds, outputs, rounds = 0, 0.0, [], 0
    for i, prompt in enumerate(prompts):
        request = replace(engine.request(prompt, f"bench{i}", max_new_tokens=new_tokens, **fields),
                          eos_token_ids=frozenset())  # fixed lengths, like the HF runs
        started = time.perf_counter()
        [result] = engine.generate([request])
        seconds += time.perf_counter() - started
        outputs.append(result.token_ids)
        tokens += len(result.token_ids)
        rounds += result.stats.rounds
        if progress is not None:
            progress.update()
    return {"tokens": tokens, "tokens_per_s": tokens / seconds, "outputs": outputs}


@torch.inference_mode()
def sequential_cascade(target, draft, tokenizer, prompt: list[int], *, alpha: float,
                       max_new_tokens: int, stop: tuple[str, ...] = ()) -> dict:
    """Token-level cascade without parallel verification (Chow's rule, greedy).

    The draft proposes each token; where max q < 1 − α the target is run (catching up on the
    draft's tokens in the same forward) and its token is used instead."""
    draft_runner, target_runner = ModelRunner(draft, max_live_seqs=1), ModelRunner(target, max_live_seqs=1)
    transcript = Transcript(tokenizer, max_new_tokens, stop, frozenset([tokenizer.eos_token_id]))
    tokens = list(prompt)
    deferrals = 0
    started = time.perf_counter()
    while transcript.finish_reason is None:
        q = draft_runner.forward([("s", tokens, 1)])[0][-1].softmax(-1)  # [vocab]
        if q.max() >= 1 - alpha:
            token = int(q.argmax())
        else:
            deferrals += 1
            token = int(target_runner.forward([("s", tokens, 1)])[0][-1].argmax())
        tokens.append(token)
        transcript.commit([token])
    return {"text": transcript.text, "token_ids": transcript.token_ids, "deferrals": deferrals,
            "total_ms": (time.perf_counter() - started) * 1000}


@torch.inference_mode()
def target_log_likelihood(target, prompt: list[int], output: list[int]) -> float:
    """Mean log p_target(output token | prefix), nats/token: how much the target likes it."""
    if not output:
        return 0.0
    ids = torch.tensor([prompt + output])
    logprobs = target(ids).logits[0, len(prompt) - 1: -1].float().log_softmax(-1)  # [len(out), vocab]
    return logprobs.gather(-1, torch.tensor(output)[:, None]).mean().item()
