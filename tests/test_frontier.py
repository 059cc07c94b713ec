"""The quality–latency frontier (`speccascade bench frontier`): its statistics as pure functions
(paired CIs, Pareto front, the knob, each rule against truncation + SD, the pilot's sizing against
its closed form), its configurations (every one a valid request), the facts family's checker, the
batched log-likelihood against the one-at-a-time reference, and the quick run end to end through
a real local service on the tiny pair (asserting what it produced, never a time)."""
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
from speccascade.bench import frontier as fr
from speccascade.bench.frontier_report import choosing_alpha, fill_readme
from speccascade.bench.frontier_stats import (Z95, best_cascade, fastest_within, knob,
                                              pareto_front, pilot_sizing, relative_half_width,
                                              tasks_for_half_width, versus_baseline)
from speccascade.bench.peers import target_log_likelihood
from speccascade.bench.workload import fact_questions, fact_tasks, frontier_tasks
from speccascade.models.evaluate import (answer_correct, continuation_log_likelihoods,
                                         line_complete, line_token_count, paired_bootstrap_ci,
                                         predicted_line, reply_complete, reply_line,
                                         reply_token_count)


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
    best = best_cascade({"rows": rows, "separating_metrics": ["m"]}, ["m"])
    assert best["name"] == "better" and best["speed_vs_speculative"] == 1.3 and best["metric"] == "m"
    assert best_cascade({"rows": rows, "separating_metrics": []}, []) is None
    # By default only external metrics count: "m" (like the target's log-likelihood) is not one.
    assert best_cascade({"rows": rows, "separating_metrics": ["m"]}) is None


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


def _brow(kind, group, value, latency, quality, distance=None, **kw):
    return {"kind": kind, "group": group, "value": value, "alpha": value, "rule": None,
            "distance": value if distance is None else distance, "latency_vs_target": latency,
            "speed_vs_speculative": 1.0 / latency, "m": quality, "m_ci": {"rel_loss_hi": 0.0}, **kw}


def test_knob_reads_the_baselines_from_their_lossless_end():
    rows = {"l=0.9": _brow("lenience", "LENIENCE", 0.9, 0.8, 1, distance=0.1),
            "l=0.5": _brow("lenience", "LENIENCE", 0.5, 0.6, 1, distance=0.5),
            "min_p=0.05": _brow("truncation", "MIN_P", 0.05, 0.9, 1),
            "min_p=0.2": _brow("truncation", "MIN_P", 0.2, 0.7, 1)}
    rows["l=0.5"]["m_ci"] = {"rel_loss_hi": 0.03}
    k = knob(rows, "m")
    assert k["LENIENCE"]["value"] == 0.9  # l = 0.5 is over the loss; l = 0.9 is nearer l = 1
    assert k["MIN_P"]["value"] == 0.2 and k["MIN_P"]["speed_vs_speculative"] == pytest.approx(1 / 0.7)
    assert "ETA" not in k  # not measured (greedy has no truncation rows): left out, not "–"
    assert k["CHOW"] is None  # a rule with no rows still gets its line


def test_a_rule_against_the_truncation_baseline_at_equal_speed():
    n = 400
    rng = random.Random(5)
    base = [rng.random() for _ in range(n)]
    table = {"SPECULATIVE": [{"m": x} for x in base],
             "SD min_p=0.1": [{"m": x + 0.05} for x in base],
             "beaten": [{"m": x + 0.01} for x in base],
             "better": [{"m": x + 0.2 + rng.gauss(0, 0.01)} for x in base],
             "fastest": [{"m": x - 0.3} for x in base],
             "tied": [{"m": x + 0.05} for x in base]}
    mean = {k: statistics.fmean(r["m"] for r in v) for k, v in table.items()}
    rows = {"SPECULATIVE": _brow("reference", None, None, 0.9, mean["SPECULATIVE"]),
            "SD min_p=0.1": _brow("truncation", "MIN_P", 0.1, 0.7, mean["SD min_p=0.1"]),
            # CHOW: slower than the baseline and worse: beaten.
            "beaten": _brow("cascade", "CHOW", 0.25, 0.75, mean["beaten"]),
            # DIFF: SPECULATIVE is the only baseline at ≥ its speed, and it is better than it.
            "better": _brow("cascade", "DIFF", -0.5, 0.8, mean["better"], distance=0.5),
            # OPT: faster than every baseline (and poor).
            "fastest": _brow("cascade", "OPT", 1.0, 0.3, mean["fastest"]),
            # TOKEN_V1: as fast and as good as the baseline: beaten (≥ speed with ≥ quality).
            "tied": _brow("cascade", "TOKEN_V1", 0.0, 0.7, mean["tied"])}
    v = versus_baseline(rows, table, "m")
    assert set(v) == {"CHOW", "DIFF", "OPT", "TOKEN_V1"}
    assert not v["CHOW"]["beats"] and v["CHOW"]["configs"][0]["baseline"] == "SD min_p=0.1"
    diff = v["DIFF"]["configs"][0]
    assert v["DIFF"]["better_at_equal_speed"] and diff["baseline"] == "SD min_p=0.1"
    assert diff["ci"]["lo"] > 0.1  # +0.15 over the best baseline at ≥ its speed
    assert v["OPT"]["beats"] and not v["OPT"]["better_at_equal_speed"]
    assert v["OPT"]["configs"][0]["verdict"] == "faster than every baseline"
    assert not v["TOKEN_V1"]["beats"]


def test_fastest_configuration_within_the_loss_may_be_a_baseline():
    rows = {"TARGET": {**_row(None, None, 0.0, 0.5), "kind": "reference"},
            "SPECULATIVE": {**_row(None, None, 0.004, 1.0), "kind": "reference"},
            "SD min_p=0.2": {**_row(None, None, 0.008, 1.2), "kind": "truncation"},
            "CHOW α=0.5": {**_row("CHOW", 0.5, 0.03, 1.6), "kind": "cascade"}}
    for r in rows.values():
        r["latency_vs_target"] = 0.5 / r["speed_vs_speculative"]  # TARGET at 0.5× SPECULATIVE
    best = fastest_within({"rows": rows, "separating_metrics": ["m"]}, ["m"])
    assert best["name"] == "SD min_p=0.2" and best["speed_vs_target"] == pytest.approx(2.4)
    assert best["kind"] == "truncation"


def test_pilot_sizing_is_the_closed_form():
    # d = ±a exactly: s_d = a·√(n/(n−1)); the tasks for a half-width h of the relative loss
    # against a TARGET mean μ are ⌈(z·s_d / (h·μ))²⌉.
    a, mu, m = 0.1, 0.5, 100
    d = [a, -a] * m
    s = a * math.sqrt(2 * m / (2 * m - 1))
    want = math.ceil((Z95 * s / (0.005 * mu)) ** 2)
    assert tasks_for_half_width(d, mu) == want == 6178  # (1.96·0.1·√(200/199) / 0.0025)²
    assert tasks_for_half_width(d, -mu) == want  # |μ|: a log-likelihood is negative
    assert relative_half_width(d, mu, want) <= 0.005 < relative_half_width(d, mu, want - 1)
    assert tasks_for_half_width(d, mu, half_width=0.01) == math.ceil((Z95 * s / (0.01 * mu)) ** 2)
    assert tasks_for_half_width([0.0] * 10, mu) is None  # no spread: nothing to size from
    assert tasks_for_half_width([0.1], mu) is None and tasks_for_half_width(d, 0.0) is None


def test_pilot_sizing_matches_the_bootstrap_it_sizes_for():
    # At the sized n, the paired bootstrap's relative-loss interval is about ±0.5 % wide.
    rng = random.Random(3)
    mu, sigma = 0.5, 0.05
    pilot = [rng.gauss(0, sigma) for _ in range(400)]
    n = tasks_for_half_width(pilot, mu)
    assert n == pytest.approx((Z95 * sigma / (0.005 * mu)) ** 2, rel=0.2)
    t = [mu + rng.gauss(0, 0.2) for _ in range(n)]
    c = [x + rng.gauss(0, sigma) for x in t]
    ci = paired_bootstrap_ci(c, t, resamples=2000)
    assert (ci["rel_loss_hi"] - ci["rel_loss_lo"]) / 2 == pytest.approx(0.005, rel=0.15)


def test_pilot_sizing_picks_the_reseeded_comparison_and_shares_the_plan():
    rng = random.Random(9)
    n = 200  # tasks: "m" is defined on the even ones only (one family of two)

    def runs(shift, noise):
        return [{"target_loglik": -1 + shift + rng.gauss(0, noise),
                 "fact_accuracy": (0.8 + shift + rng.gauss(0, noise)) if i % 2 == 0 else math.nan,
                 "edit_similarity": math.nan, "exact_match": math.nan} for i in range(n)]
    target = runs(0, 0)
    sized = pilot_sizing({"sampled": {"TARGET": target, "DRAFT": runs(-0.3, 0.2),
                                      "TARGET reseeded": runs(0, 0.05)},
                          "greedy": {"TARGET": target, "DRAFT": runs(-0.3, 0.2)}}, plan_tasks=800)
    facts = sized["sampled"]["fact_accuracy"]
    assert facts["needed_from"] == "TARGET reseeded"
    assert facts["needed"] == facts["comparisons"]["TARGET reseeded"]["tasks_needed"]
    assert facts["comparisons"]["DRAFT"]["tasks_needed"] > facts["needed"]
    assert facts["plan_tasks"] == 400  # half the plan's tasks have this metric
    assert sized["sampled"]["target_loglik"]["plan_tasks"] == 800
    assert sized["greedy"]["fact_accuracy"]["needed_from"] == "DRAFT"
    draft = facts["comparisons"]["DRAFT"]
    assert draft["separation_at_plan"] > 10  # a 0.3 gap is many half-widths at 400 tasks
    assert "edit_similarity" in sized["sampled"] and not sized["sampled"]["edit_similarity"]["comparisons"]


def test_configurations_cover_the_baselines_and_are_valid_requests(tiny_pair):
    from transformers import AutoTokenizer

    from speccascade.client import make_request
    from speccascade.serve.config import ServiceConfig
    from speccascade.serve.request import Limits, to_generation_request

    plan = fr.FrontierPlan()
    greedy, sampled = fr.configs(plan, False), fr.configs(plan, True)
    assert len(greedy) == 3 + 6 * plan.alphas_per_rule
    assert len(sampled) == len(greedy) + len(plan.lenience) + len(plan.min_p) + len(plan.eta)
    assert {c["kind"] for c in greedy.values()} == {"reference", "cascade"}
    trunc = sampled["SD min_p=0.1"]
    assert trunc["fields"]["mode"] == "target" and trunc["speed_fields"]["mode"] == "speculative"
    assert trunc["fields"]["min_p"] == trunc["speed_fields"]["min_p"] == 0.1
    assert sampled["SD η=0.01"]["speed_fields"]["eta"] == 0.01
    assert sampled["LENIENT SD l=0.5"]["fields"] == {**sampled["SPECULATIVE"]["fields"],
                                                     "lenience": 0.5}
    speed = fr.speed_configs(plan, True)
    assert speed["SD min_p=0.1"]["fields"]["mode"] == "speculative"
    assert sum(c["kind"] == "sd_end" for c in speed.values()) == 6
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    config = ServiceConfig.load({"target": {"path": str(tiny_pair[0])},
                                 "draft": {"path": str(tiny_pair[1])}})
    limits = Limits.from_config(config, vocab_size=len(tok), max_seq_len=256)
    pilot = fr.pilot_configs(plan)
    for table in (greedy, sampled, speed, pilot["sampled"]):
        for name, c in table.items():
            for i in (0, 1):
                fields = fr.seeded(c, plan, i)
                req = to_generation_request(make_request("x = 1", max_new_tokens=4, **fields),
                                            request_id=name, tokenizer=tok, limits=limits)
                if fields.get("temperature"):
                    assert req.sampling.seed == plan.seed + c.get("seed_offset", 0) + i
    assert fr.seeded(pilot["sampled"]["TARGET reseeded"], plan, 3)["seed"] == plan.seed + fr.RESEED + 3


def test_the_estimate_scales_with_the_added_configurations():
    full = fr.FrontierPlan()
    sample = full.sample()
    timings = {"startup_s": 30.0, "quality_s": 100.0, "service_check_s": 10.0, "speed_s": 50.0,
               "sequential_s": 5.0, "score_s": 20.0}
    est = fr.estimate_seconds(sample, timings, full)
    n_full = sum(len(fr.configs(full, s)) for s in (False, True))
    n_sample = sum(len(fr.configs(sample, s)) for s in (False, True))
    assert n_full == 2 * (3 + 6 * full.alphas_per_rule) + 10 and n_sample == 2 * 9 + 3
    assert est["startup_s"] == 30.0
    assert est["quality_s"] == pytest.approx(100 * (n_full * 2 * full.tasks) / (n_sample * 2 * sample.tasks))
    assert est["total_s"] == pytest.approx(sum(v for k, v in est.items() if k != "total_s"))
    # Without the baselines the same plan is cheaper.
    bare = fr.estimate_seconds(sample, timings, fr.FrontierPlan(lenience=(), min_p=(), eta=()))
    assert bare["quality_s"] < est["quality_s"] and bare["speed_s"] < est["speed_s"]


def test_fact_answers_are_checked_as_whole_words():
    assert answer_correct("The capital of Kenya is Nairobi.", ("Nairobi",))
    assert answer_correct("the capital of colombia is bogota", ("Bogota", "Bogotá"))
    assert answer_correct("It is Bogotá.", ("Bogota",))  # accents folded on both sides
    assert answer_correct('The plural of "mouse" is "mice".', ("mice",))
    assert not answer_correct('The plural of "box" is "boxs".', ("boxes",))
    assert not answer_correct("The capital of Kenya is Mombasa.", ("Nairobi",))
    assert not answer_correct("Romeo", ("Rome",)) and answer_correct("Port-au-Prince.", ("Port-au-Prince",))
    assert not answer_correct("", ("cold",))
    # No question holds its own answer: a reply that repeats the question never scores.
    questions = fact_questions()
    assert len(questions) >= 400 and {k for k, _, _ in questions} == {"capital", "antonym", "plural"}
    assert not [q for _, q, answers in questions if answer_correct(q, answers)]
    from speccascade.models.corpus import COUNTRIES  # the draft was distilled on these capitals

    assert not [q for k, q, _ in questions for c in COUNTRIES
                if k == "capital" and q.endswith(f" {c.strip()}?")]


def test_reply_line_and_its_end(tiny_pair):
    assert not reply_complete("The capital of Kenya is Nairobi.")
    assert reply_complete("The capital of Kenya is Nairobi.\n") and reply_complete("\n\nYes.\nNo")
    assert not reply_complete("\n\n  \n")
    assert reply_line("\n  The answer is cold. \nMore") == "The answer is cold."
    assert reply_line("") == ""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    ids = tok("It is cold.\nAnd more text", add_special_tokens=False)["input_ids"]
    k = reply_token_count(tok, ids)
    assert reply_complete(tok.decode(ids[:k])) and not reply_complete(tok.decode(ids[:k - 1]))


def test_frontier_tasks_interleave_the_families(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    tasks = frontier_tasks(tok, 5)
    assert [t.family for t in tasks] == ["code", "facts"] * 5
    facts = [t for t in tasks if t.family == "facts"]
    assert facts == fact_tasks(tok, 5)  # deterministic
    assert all(t.prompt.startswith("user: ") and t.prompt.endswith("assistant:") for t in facts)
    assert all(t.answers and t.kind for t in facts)
    with pytest.raises(ValueError, match="fact questions"):
        fact_tasks(tok, 10_000)
    with pytest.raises(ValueError, match="families"):
        frontier_tasks(tok, 2, ("code", "poetry"))


def test_choosing_alpha_table_fills_the_readme(tmp_path):
    def analysis(knob_rows):
        return {"separating_metrics": ["fact_accuracy"], "separation": {"fact_accuracy": 9.0},
                "knob": {"fact_accuracy": knob_rows}}
    k = {"value": 0.5, "alpha": 0.5, "rel_loss_hi": 0.004, "latency_vs_target": 0.4,
         "speed_vs_speculative": 1.3}
    results = {"started": "now", "analysis": {
        "sampled": analysis({"CHOW": k, "DIFF": None, "LENIENCE": {**k, "value": 0.7}}),
        "greedy": analysis({"CHOW": None})}}
    table = choosing_alpha(results)
    chow = next(line for line in table if line.startswith("| CHOW"))
    assert "0.5 (loss ≤ 0.40%) | 2.50× | 1.30×" in chow
    assert next(line for line in table if line.startswith("| MIN_P")).count("(not measured)") == 2
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- choosing-alpha:begin -->\nold\n<!-- choosing-alpha:end -->\nrest\n")
    assert fill_readme(readme, table)
    text = readme.read_text()
    assert "old" not in text and chow in text and text.startswith("intro\n") and text.endswith("rest\n")
    (tmp_path / "plain.md").write_text("no markers")
    assert not fill_readme(tmp_path / "plain.md", table)


@pytest.mark.e2e
def test_quick_frontier_runs_end_to_end(tmp_path, tiny_pair):
    out = tmp_path / "frontier"
    subprocess.run([sys.executable, "-m", "speccascade.cli", "bench", "frontier", "--quick",
                    "--out", str(out), "--grpc-port", str(free_port()),
                    "--http-port", str(free_port()),
                    "--target", str(tiny_pair[0]), "--draft", str(tiny_pair[1]),
                    "--dtype", "float32"],  # fp32: greedy SPECULATIVE equals TARGET exactly
                   check=True, timeout=900)
    results = json.loads((out / "frontier.json").read_text())
    plan = results["plan"]
    tasks = plan["tasks"] * len(plan["families"])
    assert results["tasks"]["families"] == ["code", "facts"]
    baselines = {"LENIENT SD l=0.5", "SD min_p=0.1", "SD η=0.01"}
    for decoding in ("greedy", "sampled"):
        assert (out / f"frontier_{decoding}.png").stat().st_size > 1000
        rows = results["analysis"][decoding]["rows"]
        assert {r["rule"] for r in rows.values() if r["rule"]} >= {
            "CHOW", "DIFF", "OPT", "TOKEN_V1", "TOKEN_V2", "TOKEN_V3"}
        assert {"TARGET", "DRAFT", "SPECULATIVE"} <= set(rows)
        # Lenience and truncation are sampled only (no-ops at temperature 0).
        assert (baselines <= set(rows)) == (decoding == "sampled")
        assert not baselines & set(rows) or decoding == "sampled"
        for name, row in rows.items():
            assert row["tokens_per_s"] > 0, name
            for metric in ("target_loglik", "edit_similarity", "exact_match", "fact_accuracy"):
                ci = row[f"{metric}_ci"]
                assert ci["lo"] <= ci["diff"] <= ci["hi"], (name, metric)
        # Each metric is scored on its own family: code metrics on half the tasks, facts on half.
        assert rows["TARGET"]["edit_similarity_ci"]["tasks"] == plan["tasks"]
        assert rows["TARGET"]["fact_accuracy_ci"]["tasks"] == plan["tasks"]
        # TARGET against itself: a zero difference with a zero-width interval.
        assert rows["TARGET"]["target_loglik_ci"]["lo"] == rows["TARGET"]["target_loglik_ci"]["hi"] == 0
        assert results["analysis"][decoding]["pareto"]["target_loglik"]
    sampled = results["analysis"]["sampled"]["rows"]
    assert sampled["SD min_p=0.1"]["kind"] == "truncation" and sampled["SD min_p=0.1"]["group"] == "MIN_P"
    assert sampled["LENIENT SD l=0.5"]["kind"] == "lenience"
    # Truncation: quality in TARGET mode, speed in SPECULATIVE mode (the same p̃).
    trunc = results["configs"]["sampled"]["SD min_p=0.1"]
    assert trunc["quality"]["mode"] == "target" and trunc["speed"]["mode"] == "speculative"
    greedy = results["outputs"]["greedy"]
    # Lossless in process (fp32): greedy SPECULATIVE writes TARGET's tokens on every task.
    # (Outputs are cut at the line's end by the client, at message granularity: compare prefixes.)
    for ref, spec in zip(greedy["TARGET"], greedy["SPECULATIVE"]):
        n = min(len(ref), len(spec))
        assert ref[:n] == spec[:n]
    assert any(name.startswith("SEQUENTIAL CHOW") for name in greedy)
    assert all(len(runs) == tasks for name, runs in greedy.items() if not name.startswith("SEQ"))
    assert results["estimate_full_run_s"]["total_s"] > 0
    # The quality pass ran in process; its first tasks also went through the service, which in
    # fp32 gives the same greedy lines for the lossless configurations.
    check_tasks = plan["service_check_tasks"]
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
    assert len(results["goals"]) == 4
    assert all(value >= 0 for value, *_ in results["goals"].values())
    assert set(results["best_cascade"]) == {"greedy", "sampled"}
    text = (out / "frontier.md").read_text()
    assert text.startswith("## Quality–latency frontier")
    assert "Which metric separates TARGET from DRAFT" in text and "![frontier sampled]" in text
    assert "The knob" in text and "Choosing α (the README's table)" in text
    assert "Cascade rounds at the SD end" in text and "The service gives the same outputs" in text
    assert (out / "choosing_alpha.md").read_text().startswith("| rule or baseline |")
    # Re-rendering from the JSON measures nothing and gives the same section.
    (out / "frontier.md").unlink()
    subprocess.run([sys.executable, "-m", "speccascade.cli", "bench", "frontier", "--results",
                    str(out / "frontier.json")], check=True, timeout=120)
    assert (out / "frontier.md").read_text() == text
