"""The pair evaluation (`speccascade models eval`): its line-completion tasks, its sign test and a
whole run on the tiny pair (what the card's fields mean is asserted, never a value of a real pair)."""
from __future__ import annotations

import math

import pytest

from speccascade.models.corpus import read_text, split_files
from speccascade.models.evaluate import PROMPT_TOKENS, evaluate, line_completion_tasks, sign_test
from speccascade.models.loader import default_pair_paths


def test_sign_test_counts_only_discordant_tasks():
    target = [1, 1, 1, 1, 1, 0, 0, 1]
    draft = [1, 0, 0, 0, 0, 0, 0, 1]  # two ties (both right), two ties (both wrong)
    assert sign_test(target, draft) == (4, 0, 1 / 16)
    assert sign_test(draft, target) == (0, 4, 1.0)
    a_only, b_only, p = sign_test([1] * 7 + [0] * 3, [0] * 7 + [1] * 3)
    assert (a_only, b_only) == (7, 3)
    assert p == pytest.approx(sum(math.comb(10, k) for k in range(7, 11)) / 1024)  # 0.172
    assert sign_test([0, 0], [0, 0]) == (0, 0, 1.0)


@pytest.fixture(scope="module")
def default_tokenizer():
    from transformers import AutoTokenizer

    target = default_pair_paths()[0]
    if not (target / "config.json").is_file():
        pytest.skip(f"the default target is not installed at {target} (make install)")
    return AutoTokenizer.from_pretrained(target, local_files_only=True)


def test_line_tasks_fit_the_context_and_come_from_held_out_files(default_tokenizer):
    tasks = line_completion_tasks(default_tokenizer, 40, seed=3)
    assert tasks == line_completion_tasks(default_tokenizer, 40, seed=3)  # deterministic
    held_out = [read_text(path) for path in split_files()[1]]
    for task in tasks:
        assert len(default_tokenizer(task.prompt, add_special_tokens=False)["input_ids"]) <= PROMPT_TOKENS
        assert task.prompt == task.prompt.rstrip() and len(task.answer) >= 8
        # The answer is the next non-blank line after the prompt, in some held-out file.
        assert any(text[at + len(task.prompt):].lstrip().startswith(task.answer)
                   for text in held_out for at in _occurrences(text, task.prompt)), task


def _occurrences(text: str, part: str):
    at = text.find(part)
    while at >= 0:
        yield at
        at = text.find(part, at + 1)


def test_evaluate_runs_end_to_end_on_the_tiny_pair(tiny_pair):
    card = evaluate(*tiny_pair, tasks=6, prompts=3, dtype="float64")
    assert card["line_tasks"] == 6
    for name in ("target", "draft"):
        assert 0 <= card[f"{name}_line_exact_match"] <= 1
        assert 0 <= card[f"{name}_line_edit_similarity"] <= 1
        assert card[f"{name}_loss"] > 0 and card[f"{name}_step_ms"] > 0
    assert card["loss_gap_nats"] == card["draft_loss"] - card["target_loss"]  # a full head
    assert card["cost_ratio_c"] == card["draft_step_ms"] / card["target_step_ms"]
    assert 1 <= card["mean_accepted_length"] <= 5 and 0 <= card["greedy_acceptance_gamma4"] <= 1
    assert 1 <= card["sampled_mean_accepted_length"] <= 5
    assert 0 <= card["sampled_sum_min_pq"] <= 1 + 1e-9
    for suffix in ("", "_batch8"):
        assert card["verify_in_target_steps" + suffix] == \
            card["verify_step_ms" + suffix] / card["target_step_ms" + suffix]
    for metric in ("exact_match", "edit_similarity"):
        diff, lo, hi = card[f"line_{metric}_target_minus_draft"]
        assert lo <= diff <= hi
    assert 0 <= card["line_exact_match_sign_test_p"] <= 1
