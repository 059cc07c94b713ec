"""The benchmark harness: the analytic bounds, and `speccascade bench --quick` as a smoke run.

The smoke run is the real command on the embedded default pair through a real local Ray Serve
application; it asserts what the run produced and that greedy outputs were lossless, never a time.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import free_port
from speccascade.bench import bounds, profile


def test_expected_tokens_matches_its_series():
    # E = Σ_{i=0..γ} α^i: the closed form against the plain sum.
    for alpha in (0.0, 0.3, 0.77, 0.999):
        for gamma in (1, 4, 8):
            assert bounds.expected_tokens(alpha, gamma) == pytest.approx(
                sum(alpha ** i for i in range(gamma + 1)))
    assert bounds.expected_tokens(1.0, 4) == 5


@pytest.mark.parametrize("alpha", [0.05, 0.4, 0.6, 0.9])
def test_alpha_from_mean_accepted_length_inverts_e(alpha):
    assert bounds.alpha_from_mean_accepted_length(bounds.expected_tokens(alpha, 4), 4) == \
        pytest.approx(alpha, abs=1e-6)


def test_bounds_follow_reference_formulas():
    # α = 0.8, γ = 4: E = 3.3616; steps target 12, draft 2, verify 16 (ms).
    e = bounds.expected_tokens(0.8, 4)
    assert bounds.sequential_bound(0.8, 4, 12, 2, 16) == pytest.approx(e * 12 / (4 * 2 + 16))
    assert bounds.pipelined_bound(0.8, 4, 12, 2, 16) == pytest.approx(e * 12 / 16)
    # drafting slower than verifying: the draft is the pipeline's bottleneck
    assert bounds.pipelined_bound(0.8, 4, 12, 5, 16) == pytest.approx(e * 12 / 20)


@pytest.mark.e2e
def test_quick_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "bench"
    markdown = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, "-m", "speccascade.cli", "bench", "--quick", "--out", str(out),
                    "--markdown", str(markdown), "--grpc-port", str(free_port()),
                    "--http-port", str(free_port()),
                    "--dtype", "float32"],  # fp32: greedy equality is exact
                   check=True, timeout=900)
    results = json.loads((out / "results.json").read_text())
    for plot in ("speed.png", "sampled.png", "cascades.png", "concurrency.png"):
        assert (out / plot).stat().st_size > 1000
    text = markdown.read_text()
    assert "## Goals" in text and "![cascades]" in text and "## Sampled decoding" in text
    # Lossless in both places, and every configuration was actually measured.
    assert results["in_process_greedy_equal"] is True
    assert results["derived"]["greedy_equal_to_target"] is True
    speed = results["service"]["speed"]
    assert {"TARGET", "DRAFT", "SPECULATIVE sequential", "SPECULATIVE pipelined"} <= set(speed)
    assert all(s["tokens"] > 0 for s in speed.values())
    assert speed["SPECULATIVE pipelined"]["mean_accepted_length"] >= 1.0
    # pipelined: true drafts ahead every round it can; pipelined: false never does
    assert speed["SPECULATIVE always ahead"]["round_drafted_ahead"] > 0
    assert speed["SPECULATIVE sequential"]["round_drafted_ahead"] == 0
    assert "Draft-ahead (" in text
    cascades = results["service"]["cascade"]
    assert {c["fields"].get("deferral_rule") for c in cascades.values()} >= {
        "CHOW", "DIFF", "OPT", "TOKEN_V1", "TOKEN_V2", "TOKEN_V3"}
    sampled = results["service"]["sampled"]
    assert {"TARGET", "SPECULATIVE pipelined", "CASCADE TOKEN_V3 SD end"} <= set(sampled)
    assert all(s["tokens"] > 0 for s in sampled.values())
    assert sampled["SPECULATIVE pipelined"]["acceptance_rate"] > 0
    # CPU per round by process, measured for every single-stream configuration.
    assert "Router" in speed["SPECULATIVE pipelined"]["cpu_ms_per_round"]
    concurrency = results["service"]["concurrency"]
    assert set(concurrency) == {"TARGET", "SPECULATIVE"}
    assert all(set(levels) == {"1", "4"} for levels in concurrency.values())
    assert concurrency["SPECULATIVE"]["4"]["mean_batch_size"]["verifier"] >= 1.0
    # The speculation-control sweep: every configuration at every stream count, greedy and
    # sampled, and the controller's γ per round recorded.
    sweep = results["service"]["sweep"]
    for kind in ("greedy", "sampled"):
        table = sweep[kind]
        assert {"TARGET", "γ=2", "γ=4", "transformers heuristic", "controller (γ unset)"} == set(table)
        assert all(set(cells) == {"1", "4"} and all(c["tokens"] > 0 for c in cells.values())
                   for cells in table.values())
        controller = table["controller (γ unset)"]["4"]
        assert sum(controller["gamma_histogram"]) > 0
        assert table["γ=4"]["1"]["mean_gamma"] >= 2.5   # explicit γ as given (cut at the end)
    assert (out / "sweep.png").stat().st_size > 1000
    assert "## Speculation control: tokens/s against streams" in text
    assert any("controller / best fixed γ" in goal for goal in results["derived"]["goals"])
    assert 0 < results["runner_overhead"]["target"]["forward_ms"]
    # the router was profiled (2 s in the quick run: our own frames may not show up in so few)
    profile = results["service"]["router_profile"]
    assert profile["samples"] > 0 and 0 <= profile["speccascade_on_stack"] <= 1
    assert sum(profile["self_share"].values()) == pytest.approx(1)
    assert "Router profile (py-spy" in text and "### What limits the goals not met" in text
    # `bench report` re-renders the same markdown from results.json alone
    again = tmp_path / "again.md"
    subprocess.run([sys.executable, "-m", "speccascade.cli", "bench", "report", "--results",
                    str(out / "results.json"), "--markdown", str(again)], check=True, timeout=120)
    assert again.read_text().replace(str(again.parent), "") == text.replace(str(markdown.parent), "")


def test_profile_summary_charges_the_innermost_frame():
    raw = ("main (/x/speccascade/serve/router.py:10);call (/v/ray/serve/handle.py:5) 30\n"
           "main (/x/speccascade/serve/router.py:10);_run (/v/asyncio/events.py:80) 10\n"
           "_run (/v/asyncio/events.py:80);get (/v/ray/_raylet.pyx:1) 60\n")
    summary = profile.summarize(raw)
    assert summary["samples"] == 100
    assert summary["self_share"] == {"Ray core": 0.6, "Ray Serve": 0.3, "asyncio": 0.1}
    assert summary["speccascade_on_stack"] == pytest.approx(0.4)


def test_sweep_goals_hold_the_controller_to_the_best_fixed_gamma_of_each_level():
    from speccascade.bench import sweep

    def level(tps):
        return {"aggregate_tokens_per_s": tps}

    table = {"TARGET": {1: level(50), "8": level(60)},              # str keys: read back from JSON
             "γ=2": {1: level(90), "8": level(150)}, "γ=4": {1: level(100), "8": level(120)},
             sweep.HEURISTIC: {1: level(80), "8": level(140)},
             sweep.CONTROLLER: {1: level(95), "8": level(150)}}
    goals = sweep.goals({"greedy": table})
    assert goals["greedy: controller / best fixed γ, worst stream count"][0] == pytest.approx(0.95)
    assert goals["greedy: controller / TARGET, worst stream count"][0] == pytest.approx(1.9)
    assert goals["greedy, 1 stream: controller / transformers heuristic"][0] == pytest.approx(95 / 80)
