"""The benchmark stages that run through the real gRPC service (see bench/run.py for the plan).

Every configuration is measured on the same prompts in one run, with the CPU time each process
spent per round (from /proc), so that where the cores went is read beside the speed.
"""
from __future__ import annotations

from tqdm import tqdm

from speccascade.bench.measure import cpu_ms_per_round, cpu_seconds_by_process, stream_one, summarize
from speccascade.bench.peers import target_log_likelihood
from speccascade.models.evaluate import LINE_TOKENS, edit_similarity, exact_match, predicted_line
from speccascade.sampling import SD_END, DeferralRule

SAMPLED = dict(temperature=0.8, top_p=0.95, seed=1234)


def sd_end_cascades(gamma: int, **fields) -> dict[str, dict]:
    """Every rule at its speculative-decoding end: the same verification as SPECULATIVE."""
    return {f"CASCADE {rule.name} SD end": dict(mode="cascade", deferral_rule=rule.name,
                                                deferral_threshold=SD_END[rule],
                                                num_draft_tokens=gamma, **fields)
            for rule in DeferralRule}


def slowest_sd_end(table: dict[str, dict], reference: str) -> tuple[float, str]:
    """The slowest `sd_end_cascades` configuration of a speed table against `reference`:
    (its tokens/s over the reference's, its name)."""
    ends = {name: s["tokens_per_s"] for name, s in table.items() if name.endswith(" SD end")}
    slowest = min(ends, key=ends.get)
    return ends[slowest] / table[reference]["tokens_per_s"], slowest


def speed_configs(plan) -> dict[str, dict]:
    """Greedy, single stream."""
    configs = {
        "TARGET": dict(mode="target"),
        "DRAFT": dict(mode="draft", num_draft_tokens=plan.gamma),
        "SPECULATIVE sequential": dict(mode="speculative", num_draft_tokens=plan.gamma,
                                       pipelined=False),
        "SPECULATIVE pipelined": dict(mode="speculative", num_draft_tokens=plan.gamma),
        # The default above drafts ahead only when the running acceptance says it pays.
        "SPECULATIVE always ahead": dict(mode="speculative", num_draft_tokens=plan.gamma,
                                         pipelined=True),
    }
    for gamma in plan.gammas:
        configs[f"SPECULATIVE γ={gamma}"] = dict(mode="speculative", num_draft_tokens=gamma)
    configs["SPECULATIVE controller (γ unset)"] = dict(mode="speculative")
    configs["SPECULATIVE adaptive γ"] = dict(mode="speculative", adaptive_num_draft_tokens=True)
    configs["SPECULATIVE adaptive γ + early stop"] = dict(
        mode="speculative", adaptive_num_draft_tokens=True, draft_stop_below=0.4)
    return {**configs, **sd_end_cascades(plan.gamma)}


def sampled_configs(plan) -> dict[str, dict]:
    """Temperature 0.8, top_p 0.95, single stream: the traffic most users send."""
    return {
        "TARGET": dict(mode="target", **SAMPLED),
        "SPECULATIVE sequential": dict(mode="speculative", num_draft_tokens=plan.gamma,
                                       pipelined=False, **SAMPLED),
        "SPECULATIVE pipelined": dict(mode="speculative", num_draft_tokens=plan.gamma, **SAMPLED),
        "SPECULATIVE always ahead": dict(mode="speculative", num_draft_tokens=plan.gamma,
                                         pipelined=True, **SAMPLED),
        "SPECULATIVE controller (γ unset)": dict(mode="speculative", **SAMPLED),
        **sd_end_cascades(plan.gamma, **SAMPLED),
        "CASCADE TOKEN_V3 α=0.5": dict(mode="cascade", deferral_rule="TOKEN_V3",
                                       deferral_threshold=0.5, num_draft_tokens=plan.gamma,
                                       **SAMPLED),
    }


def measure_configs(client, prompts, configs: dict[str, dict], *, desc: str,
                    max_new_tokens: int) -> tuple[dict, dict]:
    """Every configuration over all prompts, one request at a time, interleaved (for each prompt,
    every configuration in turn) so that a machine whose speed drifts during the run slows all of
    them alike: (summaries, token ids per config)."""
    runs: dict[str, list] = {name: [] for name in configs}
    cpu: dict[str, dict[str, float]] = {name: {} for name in configs}
    with tqdm(total=len(configs) * len(prompts), desc=desc, unit="req") as bar:
        for prompt in prompts:
            for name, fields in configs.items():
                before = cpu_seconds_by_process()
                runs[name].append(stream_one(client, prompt, max_new_tokens=max_new_tokens, **fields))
                after = cpu_seconds_by_process()
                for process, seconds in after.items():
                    cpu[name][process] = cpu[name].get(process, 0.0) + seconds - before.get(process, 0.0)
                bar.update()
    summaries = {}
    for name, done in runs.items():
        summaries[name] = summarize(done)
        summaries[name]["cpu_ms_per_round"] = cpu_ms_per_round(
            {}, cpu[name], sum(r.stats.get("rounds", 0) for r in done))
    return summaries, {name: [r.token_ids for r in done] for name, done in runs.items()}


def first_divergence(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How many outputs equal the reference token for token, and after how many tokens the rest
    part from it (bf16 logits depend slightly on the batch shape: a near-tie can flip)."""
    parted = []
    for ref, out in zip(reference, other):
        if ref != out:
            parted.append(next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b),
                               min(len(ref), len(out))))
    return {"identical": len(reference) - len(parted), "outputs": len(reference),
            "first_divergence_tokens": sorted(parted)}


def cascade_quality(client, plan, tasks, target, engine) -> dict:
    """Line completion through the service for every rule over its α range (greedy)."""
    from speccascade.bench.run import alpha_sweep

    configs = {"TARGET": dict(mode="target"),
               "SPECULATIVE": dict(mode="speculative", num_draft_tokens=plan.gamma),
               "DRAFT": dict(mode="draft", num_draft_tokens=plan.gamma)}
    for rule in DeferralRule:
        for alpha in alpha_sweep(rule, plan.alphas_per_rule):
            configs[f"{rule.name} α={alpha:g}"] = dict(
                mode="cascade", deferral_rule=rule.name, deferral_threshold=alpha,
                num_draft_tokens=plan.gamma)
    out, all_runs = {}, {name: [] for name in configs}
    with tqdm(total=len(configs) * len(tasks), desc="service: cascades", unit="task") as bar:
        for task in tasks:  # interleaved, as in measure_configs
            for name, fields in configs.items():
                all_runs[name].append(stream_one(client, task.prompt, max_new_tokens=LINE_TOKENS,
                                                 **fields))
                bar.update()
        for name, fields in configs.items():
            runs = all_runs[name]
            preds = [predicted_line(r.text) for r in runs]
            answers = [t.answer for t in tasks]
            loglik = [target_log_likelihood(target, engine.encode(t.prompt), r.token_ids)
                      for t, r in zip(tasks, runs)]
            out[name] = {**summarize(runs), "fields": fields,
                         "exact_match": sum(map(exact_match, preds, answers)) / len(tasks),
                         "edit_similarity": sum(map(edit_similarity, preds, answers)) / len(tasks),
                         "target_loglik": sum(loglik) / len(loglik)}
    return out


def batch_counters(client) -> dict[str, tuple[int, int]]:
    """(batches, batched_calls) summed over the replicas of each role."""
    counters: dict[str, tuple[int, int]] = {}
    for r in client.stats().replicas:
        batches, calls = counters.get(r.role, (0, 0))
        counters[r.role] = (batches + r.batches, calls + r.batched_calls)
    return counters
