"""The quality–latency frontier (`speccascade bench frontier`): its statistics as pure functions,
the batched log-likelihood against the one-at-a-time reference, and the quick run end to end
through a real local service (asserting what it produced, never a time)."""
from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import free_port
from speccascade.bench.frontier import best_cascade, knob, pareto_front
from speccascade.bench.peers import target_log_likelihood
from speccascade.models.evaluate import (continuation_log_likelihoods, line_complete,
                                         line_token_count, paired_bootstrap_ci, predicted_line)


def test_bootstrap_of_a_constant_shift_is_that_shift():
    b = [random.Random(1).random() for _ in range(200)]
    ci = paired_bootstrap_ci([x + 0.25 for x in b], b)
    assert ci["tasks"] == 200
    assert ci["diff"] == pytest.approx(0.25) and ci["lo"] == pytest.approx(0.25) \
        and ci["hi"] == pytest.approx(0.25)


def test_bootstrap_matches_the_normal_interval_of_a_known_case():
    # Paired differences d ~ N(0.1, 1): the percentile bootstrap of the mean approaches
    # mean(d) ± 1.96·sd(d)/√n for n this large.
    rng = random.Random(7)
    b = [rng.gauss(0, 1) for _ in range(2000)]
    d = [rng.gauss(0.1, 1) for _ in range(2000)]
    ci = paired_bootstrap_ci([x + y for x, y in zip(b, d)], b, seed=3)
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    assert ci["diff"] == pytest.approx(statistics.fmean(d))
    assert ci["lo"] == pytest.approx(ci["diff"] - half, abs=0.01)
    assert ci["hi"] == pytest.approx(ci["diff"] + half, abs=0.01)
    assert ci["lo"] > 0  # a real difference of 0.1 at n = 2000: the interval excludes 0
    assert ci == paired_bootstrap_ci([x + y for x, y in zip(b, d)], b, seed=3)  # fixed seed


def test_bootstrap_of_noise_includes_zero_and_pairs_the_tasks():
    rng = random.Random(11)
    b = [rng.random() for _ in range(500)]
    # a = b plus small symmetric noise: paired, the tiny noise decides; unpaired, b's spread would.
    a = [x + rng.choice((-1e-3, 1e-3)) for x in b]
    ci = paired_bootstrap_ci(a, b)
    assert ci["lo"] < 0 < ci["hi"] and ci["hi"] - ci["lo"] < 1e-3
    # Relative loss is (mean b − mean a) / |mean b|, b the reference.
    assert ci["rel_loss"] == pytest.approx((statistics.fmean(b) - statistics.fmean(a)) / statistics.fmean(b))
    assert ci["rel_loss_lo"] <= ci["rel_loss"] <= ci["rel_loss_hi"]


def test_bootstrap_leaves_out_tasks_with_a_nan():
    ci = paired_bootstrap_ci([1.0, math.nan, 3.0], [0.0, 5.0, 1.0])
    assert ci["tasks"] == 2 and ci["diff"] == pytest.approx(1.5)


def test_pareto_front_keeps_only_unbeaten_points():
    points = {"slow good": (1.0, 0.9), "fast bad": (0.3, 0.5), "beaten": (0.8, 0.6),
              "mid": (0.5, 0.7), "tie of mid": (0.5, 0.7), "dominated by mid": (0.6, 0.7)}
    assert pareto_front(points) == ["fast bad", "mid", "tie of mid", "slow good"]


def _row(rule, alpha, rel_hi, speed=1.1):
    return {"rule": rule, "alpha": alpha, "latency_vs_target": 1 / speed,
            "speed_vs_speculative": speed, "m_ci": {"rel_loss_hi": rel_hi}}


def test_knob_stops_at_the_first_alpha_over_the_loss_from_the_sd_end():
    rows = {"a": _row("CHOW", 0.25, 0.004, 1.1), "b": _row("CHOW", 0.5, 0.02, 1.3),
            "c": _row("CHOW", 0.75, 0.009, 1.5),  # passes by chance past a failing α: not taken
            "d": _row("DIFF", -0.5, 0.05), "e": _row("TOKEN_V3", 0.5, 0.01, 1.2),
            "seq": {**_row("CHOW", 0.1, 0.0), "speed_vs_speculative": None}}  # in process: not a knob
    k = knob(rows, "m")
    assert k["CHOW"]["alpha"] == 0.25 and k["CHOW"]["speed_vs_speculative"] == 1.1
    assert k["DIFF"] is None and k["OPT"] is None
    assert k["TOKEN_V3"]["alpha"] == 0.5


def test_best_cascade_is_the_fastest_within_the_loss_on_a_separating_metric():
    rows = {"TARGET": {**_row(None, None, 0.0, 0.8)},
            "fast lossy": _row("CHOW", 0.75, 0.02, 1.6),
            "ok": _row("CHOW", 0.25, 0.004, 1.1), "better": _row("TOKEN_V3", 0.5, 0.01, 1.3),
            "seq": {**_row("CHOW", 0.1, 0.0), "speed_vs_speculative": None}}
    best = best_cascade({"rows": rows, "separating_metrics": ["m"]})
    assert best["name"] == "better" and best["speed_vs_speculative"] == 1.3 and best["metric"] == "m"
    assert best_cascade({"rows": rows, "separating_metrics": []}) is None


def test_line_end_and_its_tokens(tiny_pair):
    assert not line_complete("\n    return x")
    assert line_complete("\n\n    return x\n") and line_complete(")\n    y = 1\n    z")
    assert not line_complete(")  # comment\n   \n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    ids = tok("\n    return x * 3 + 3\ndef f4(x):", add_special_tokens=False)["input_ids"]
    k = line_token_count(tok, ids)
    assert line_complete(tok.decode(ids[:k])) and not line_complete(tok.decode(ids[:k - 1]))
    assert predicted_line(tok.decode(ids[:k])) == predicted_line(tok.decode(ids))
    assert line_token_count(tok, ids[:2]) == 2  # never complete: every token


def test_batched_log_likelihood_equals_one_forward_per_output(tiny_pair):
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 300, (17,), generator=g).tolist()
    outputs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 1, 9)]
    outputs += [[], outputs[0]]  # an empty output, and a repeat scored once
    got = continuation_log_likelihoods(target, prompt, outputs)
    want = [target_log_likelihood(target, prompt, o) for o in outputs[:3]]
    assert got[:3] == pytest.approx(want, abs=1e-5)  # both log_softmax in float32
    assert math.isnan(got[3]) and got[4] == got[0]


@pytest.mark.e2e
def test_quick_frontier_runs_end_to_end(tmp_path):
    out = tmp_path / "frontier"
    subprocess.run([sys.executable, "-m", "speccascade.cli", "bench", "frontier", "--quick",
                    "--out", str(out), "--grpc-port", str(free_port()),
                    "--http-port", str(free_port()),
                    "--dtype", "float32"],  # fp32: greedy SPECULATIVE equals TARGET exactly
                   check=True, timeout=900)
    results = json.loads((out / "frontier.json").read_text())
    tasks = results["plan"]["tasks"]
    for decoding in ("greedy", "sampled"):
        assert (out / f"frontier_{decoding}.png").stat().st_size > 1000
        rows = results["analysis"][decoding]["rows"]
        assert {r["rule"] for r in rows.values() if r["rule"]} >= {
            "CHOW", "DIFF", "OPT", "TOKEN_V1", "TOKEN_V2", "TOKEN_V3"}
        assert {"TARGET", "DRAFT", "SPECULATIVE"} <= set(rows)
        for name, row in rows.items():
            assert row["tokens_per_s"] > 0, name
            for metric in ("target_loglik", "edit_similarity", "exact_match"):
                ci = row[f"{metric}_ci"]
                assert ci["lo"] <= ci["diff"] <= ci["hi"], (name, metric)
        # TARGET against itself: a zero difference with a zero-width interval.
        assert rows["TARGET"]["target_loglik_ci"]["lo"] == rows["TARGET"]["target_loglik_ci"]["hi"] == 0
        assert results["analysis"][decoding]["pareto"]["target_loglik"]
    greedy = results["outputs"]["greedy"]
    # Lossless in process (fp32): greedy SPECULATIVE writes TARGET's tokens on every task.
    # (Outputs are cut at the line's end by the client, at message granularity: compare prefixes.)
    for ref, spec in zip(greedy["TARGET"], greedy["SPECULATIVE"]):
        n = min(len(ref), len(spec))
        assert n > 0 and ref[:n] == spec[:n]
    assert any(name.startswith("SEQUENTIAL CHOW") for name in greedy)
    assert all(len(runs) == tasks for name, runs in greedy.items() if not name.startswith("SEQ"))
    assert results["estimate_full_run_s"]["total_s"] > 0
    # The quality pass ran in process; its first tasks also went through the service, which in
    # fp32 gives the same greedy lines for the lossless configurations.
    check_tasks = results["plan"]["service_check_tasks"]
    for decoding in ("greedy", "sampled"):
        check = results["service_check"][decoding]
        assert set(check) == {n for n in results["analysis"][decoding]["rows"]
                              if not n.startswith("SEQUENTIAL")}
        assert all(c["tasks"] == check_tasks for c in check.values())
        # Every rule at its SD end is timed beside SPECULATIVE.
        ends = [s for s in results["speed"][decoding].values() if s.get("sd_end")]
        assert {s["rule"] for s in ends} == {"CHOW", "DIFF", "OPT", "TOKEN_V1", "TOKEN_V2", "TOKEN_V3"}
        assert all(s["tokens_per_s"] > 0 for s in ends)
    for name in ("TARGET", "SPECULATIVE"):
        assert results["service_check"]["greedy"][name]["same_line"] == check_tasks, name
    assert len(results["goals"]) == 3
    assert all(value >= 0 for value, *_ in results["goals"].values())
    assert set(results["best_cascade"]) == {"greedy", "sampled"}
    text = (out / "frontier.md").read_text()
    assert text.startswith("## Quality–latency frontier")
    assert "Which metric separates TARGET from DRAFT" in text and "![frontier sampled]" in text
    assert "The knob" in text
    assert "Cascade rounds at the SD end" in text and "The service gives the same outputs" in text
