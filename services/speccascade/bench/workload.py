"""The fixed prompt sets: held-out chat and code prompts (speed), line-completion tasks (quality)."""
from __future__ import annotations

from speccascade.models.evaluate import LineTask, line_completion_tasks


def throughput_prompts(tokenizer, n: int, prompt_tokens: int = 192) -> list[list[int]]:
    """n held-out prompts, chat (through the chat template) and raw code alternating: the ones
    the default pair's card measures acceptance on (models.evaluate.held_out_prompts), never
    seen in the draft's distillation; each cut to its last prompt_tokens tokens."""
    from speccascade.models.evaluate import held_out_prompts

    chat, code = (held_out_prompts(tokenizer, kind, n, prompt_tokens) for kind in ("chat", "code"))
    mixed = [p for pair in zip(chat, code) for p in pair] + chat[len(code):] + code[len(chat):]
    return mixed[:n]


def quality_tasks(tokenizer, n: int) -> list[LineTask]:
    return line_completion_tasks(tokenizer, n, seed=1)
