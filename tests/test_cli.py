"""`speccascade generate` as a user runs it: a subprocess on a pair loaded from local paths."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROMPT = "def f3(x):\n    return"


def generate(pair, *options: str) -> subprocess.CompletedProcess:
    target, draft = pair
    return subprocess.run([sys.executable, "-m", "speccascade.cli", "generate", PROMPT,
                           "--target", str(target), "--draft", str(draft), "--dtype", "float64",
                           *options], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def outputs(tiny_pair):
    runs = {mode: generate(tiny_pair, "--mode", mode, "--max-new-tokens", "24")
            for mode in ("target", "draft", "speculative", "cascade")}
    for mode, run in runs.items():
        assert run.returncode == 0, (mode, run.stderr[-2000:])
    return runs


def test_every_mode_prints_the_text_and_its_stats(outputs):
    for mode, run in outputs.items():
        assert run.stdout.startswith(PROMPT) and len(run.stdout) > len(PROMPT)
        assert f"-- {mode}: 24 tokens" in run.stderr
        assert "rounds=" in run.stderr and "mean_accepted_length=" in run.stderr


def test_greedy_speculative_and_sd_end_cascade_print_the_target_text(outputs):
    assert outputs["speculative"].stdout == outputs["target"].stdout
    assert outputs["cascade"].stdout == outputs["target"].stdout  # default α is the rule's SD end


def test_request_past_the_context_is_refused_with_a_message(tiny_pair):
    run = generate(tiny_pair, "--max-new-tokens", "300")  # the tiny models' context is 256
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "exceeds the model context of 256 tokens" in run.stderr


def test_sampling_baselines_are_flags_and_are_checked(tiny_pair):
    run = generate(tiny_pair, "--mode", "speculative", "--temperature", "1", "--min-p", "0.1",
                   "--eta", "0.001", "--lenience", "0.5", "--max-new-tokens", "8", "--seed", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "-- speculative: 8 tokens" in run.stderr
    run = generate(tiny_pair, "--mode", "target", "--temperature", "1", "--lenience", "0.5")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "lenience (lossy speculative decoding) applies to mode SPECULATIVE only" in run.stderr
