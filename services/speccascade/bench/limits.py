"""What limits each goal a run misses, in that run's own numbers (for BENCHMARKS.md).

Every sentence is computed from results.json: the bound, the round's decomposition, the CPU per
round by process, the RPC floor and the router's py-spy profile. Nothing here is hand-written data.
"""
from __future__ import annotations


def other_ms(s: dict) -> float:
    """A round's time outside verification and exposed (not hidden) drafting."""
    return s["round_ms"] - s["round_verify_ms"] - s["round_draft_ms"] + s["round_hidden_draft_ms"]


def _round(s: dict) -> str:
    return (f"a round took {s['round_ms']:.1f} ms for {s['mean_accepted_length']:.2f} tokens: verify "
            f"{s['round_verify_ms']:.1f}, exposed draft {s['round_draft_ms'] - s['round_hidden_draft_ms']:.1f}, "
            f"other {other_ms(s):.1f}")


def _cpu(s: dict, top: int = 4) -> str:
    cpu = sorted(s.get("cpu_ms_per_round", {}).items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {ms:.1f}" for name, ms in cpu)


def _profile(p: dict) -> str:
    share = p.get("self_share", {})
    ray = share.get("Ray core", 0) + share.get("Ray Serve", 0) + share.get("grpc", 0)
    return (f"py-spy on the router ({p.get('samples', 0)} samples): {ray:.0%} of samples in Ray, "
            f"Serve and grpc frames (Ray's core worker is native code behind `ray/_raylet.pyx`), "
            f"{share.get('speccascade', 0):.0%} in speccascade's own frames (on the stack in "
            f"{p.get('speccascade_on_stack', 0):.0%}), asyncio {share.get('asyncio', 0):.0%}, thread "
            f"run loops and pools (native calls below them) "
            f"{share.get('thread run loops', 0) + share.get('thread pools', 0):.0%}")


def _scaling(conc: dict, mode: str, many: int) -> str:
    levels = {int(k): v for k, v in conc[mode].items()}
    if many not in levels or 1 not in levels:
        return ""
    a, b = levels[1], levels[many]
    return (f"{mode}: {a['aggregate_tokens_per_s']:.0f} → {b['aggregate_tokens_per_s']:.0f} tok/s; "
            f"the cores were {a.get('cpu_busy_fraction', 0):.0%} busy at 1 stream and "
            f"{b.get('cpu_busy_fraction', 0):.0%} at {many}; CPU per round at {many} streams (ms): "
            f"{_cpu(b)}; mean verifier batch {b['mean_batch_size'].get('verifier', 0):.1f}")


def explain(results: dict) -> list[str]:
    """One markdown bullet per missed goal."""
    d, svc, steps = results["derived"], results["service"], results["steps_ms"]
    speed, sampled, conc = svc["speed"], svc["sampled"], svc["concurrency"]
    pipe, seq = speed["SPECULATIVE pipelined"], speed["SPECULATIVE sequential"]
    always = speed["SPECULATIVE always ahead"]
    floor, prof = results["rpc_floor_ms"], svc.get("router_profile", {})
    why = {
        "median non-model time per round (ms)":
            f"{_round(pipe)}. One empty router → verifier call costs {floor['router_to_verifier']:.2f} ms "
            f"and a raw Ray actor call {floor['raw_ray_actor']:.2f} ms; every round makes a verify call, "
            f"a draft call unless its block was drafted ahead, and streams one message through the proxy",
        "router CPU per round (ms)": f"CPU per round (ms): {_cpu(pipe, 6)}. {_profile(prof)}",
        "greedy SPECULATIVE pipelined / pipelined bound":
            f"the bound's round is one verification ({steps['verify']:.1f} ms in process) with the draft "
            f"fully hidden; through the service {_round(pipe)}",
        "greedy SPECULATIVE (service) / HF assisted (in process)":
            f"in process our own loop runs at {results['in_process']['engine_speculative']['tokens_per_s']:.1f} "
            f"tok/s and HF assisted at {results['in_process']['hf_assisted']['tokens_per_s']:.1f}; the "
            f"service at {pipe['tokens_per_s']:.1f}: {_round(pipe)}",
        "sampled SPECULATIVE / sampled TARGET":
            f"sampled α = {d['sampled_alpha']:.2f} (greedy {d['alpha']:.2f}) caps the speedup at "
            f"{d['sampled_pipelined_bound']:.2f}×; {_round(sampled['SPECULATIVE pipelined'])}",
        "sampled SPECULATIVE / its pipelined bound": _round(sampled["SPECULATIVE pipelined"]),
        "pipelined / sequential":
            f"the gate drafted {pipe.get('round_drafted_ahead', 0):.2f} tokens ahead per round; always "
            f"drafting ahead gives {always['tokens_per_s'] / seq['tokens_per_s']:.2f}× sequential and "
            f"discards {always.get('round_discarded_draft_tokens', 0):.2f} tokens per round. On 2 shared "
            f"cores the overlapped draft slows the verifier: verify per round {always['round_verify_ms']:.1f} "
            f"ms always-ahead against {seq['round_verify_ms']:.1f} ms sequential",
        "greedy cascade at its SD end (slowest rule) / SPECULATIVE": _slowest(speed),
        "sampled cascade at its SD end (slowest rule) / SPECULATIVE": _slowest(sampled),
        "8 greedy SPECULATIVE streams / 1 stream": _scaling(conc, "SPECULATIVE", 8),
        "16 streams / 8 streams": _scaling(conc, "SPECULATIVE", 16),
        "8 TARGET streams / 1 TARGET stream": _scaling(conc, "TARGET", 8),
        "verifier runner time outside the forward at B=8 / forward":
            f"runner {results['runner_overhead']['target']['runner_ms']:.1f} ms per call, forward "
            f"{results['runner_overhead']['target']['forward_ms']:.1f} ms",
        "best cascade with ≤ 1 % line-completion loss: speed / SPECULATIVE":
            f"best passing configuration: {d.get('best_cascade') or 'none passed'}; issue 17's "
            f"frontier (`make frontier`) measures this with confidence intervals",
    }
    why.update(_sweep_why(svc.get("sweep", {})))
    lines = []
    for name, (value, goal, op, issue) in d["goals"].items():
        met = value >= goal if op == "≥" else value <= goal
        if not met:
            lines.append(f"- **{name}** (issue {issue}): {value:.2f}, goal {op} {goal}. "
                         f"{why.get(name, '')}.")
    return lines


def _slowest(table: dict) -> str:
    from speccascade.bench.service import slowest_sd_end

    _, name = slowest_sd_end(table, "SPECULATIVE pipelined")
    spec = table["SPECULATIVE pipelined"]
    return (f"slowest: {name}, {table[name]['tokens_per_s']:.1f} against {spec['tokens_per_s']:.1f} "
            f"tok/s; {_round(table[name])}; SPECULATIVE: {_round(spec)}")


def _sweep_why(sweep: dict) -> dict[str, str]:
    """For the controller's goals: at the level where it is furthest from the best fixed γ, the
    γ it chose against that best γ, and the heuristic's mean γ at one stream."""
    from speccascade.bench.sweep import CONTROLLER, HEURISTIC, cell

    out = {}
    for kind, table in sweep.items():
        def tps(name, n):
            return cell(table, name, n)["aggregate_tokens_per_s"]
        levels = sorted({int(n) for n in table[CONTROLLER]})
        fixed = [name for name in table if name.startswith("γ=")]
        n = min(levels, key=lambda n: tps(CONTROLLER, n) / max(tps(f, n) for f in fixed))
        best = max(fixed, key=lambda f: tps(f, n))
        chosen, best_gamma = cell(table, CONTROLLER, n)["mean_gamma"], int(best.split("=")[1])
        out[f"{kind}: controller / best fixed γ, worst stream count"] = (
            f"at {n} stream{'s' * (n > 1)} the controller chose mean γ {chosen:.1f} "
            f"({tps(CONTROLLER, n):.1f} tok/s) where {best} ran {tps(best, n):.1f}; its model of "
            f"the round (the replicas' cost fits, per-position acceptance) put the optimum "
            f"{'below' if chosen < best_gamma else 'above'} the best fixed γ")
        if 1 in levels:
            out[f"{kind}, 1 stream: controller / transformers heuristic"] = (
                f"the heuristic reached mean γ {cell(table, HEURISTIC, 1)['mean_gamma']:.1f} (up to "
                f"the server's maximum 16) at {tps(HEURISTIC, 1):.1f} tok/s; the controller's γmax "
                f"is 8 and it chose mean γ {cell(table, CONTROLLER, 1)['mean_gamma']:.1f}")
    return out
