"""The fixed prompt sets: code from held-out stdlib files (never seen in training)."""
from __future__ import annotations

from speccascade.models.corpus import read_text, split_files
from speccascade.models.evaluate import LineTask, line_completion_tasks


def throughput_prompts(tokenizer, n: int, prompt_tokens: int = 128) -> list[list[int]]:
    """n prompts of prompt_tokens tokens: the start of each of n held-out files, in path order."""
    _, held_out = split_files()
    prompts = []
    for path in held_out:
        ids = tokenizer(read_text(path), add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens + 64:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n:
            break
    return prompts


def quality_tasks(tokenizer, n: int) -> list[LineTask]:
    return line_completion_tasks(tokenizer, n, seed=1)
