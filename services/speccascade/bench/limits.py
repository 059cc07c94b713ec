"""What limits each goal a run misses, in that run's own numbers (for BENCHMARKS.md).

Every sentence is computed from results.json: the round's decomposition, the CPU per round by
process, the mean rows per forward, the hop and the router's py-spy profile. Nothing here is
hand-written data.
"""
from __future__ import annotations

from speccascade.bench.sweep import CONTROLLER, cell


def other_ms(s: dict) -> float:
    """A round's time outside verification and exposed (not hidden) drafting."""
    return s["round_ms"] - s["round_verify_ms"] - s["round_draft_ms"] + s["round_hidden_draft_ms"]


def _round(s: dict) -> str:
    return (f"a round took {s['round_ms']:.1f} ms for {s['mean_accepted_length']:.2f} tokens: verify "
            f"{s['round_verify_ms']:.1f}, exposed draft {s['round_draft_ms'] - s['round_hidden_draft_ms']:.1f}, "
            f"other {other_ms(s):.1f}")


def cpu_line(s: dict, top: int = 5) -> str:
    cpu = sorted(s.get("cpu_ms_per_round", {}).items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {ms:.1f}" for name, ms in cpu)


def _profile(p: dict) -> str:
    share = p.get("self_share", {})
    ray = share.get("Ray core", 0) + share.get("Ray Serve", 0) + share.get("grpc", 0)
    return (f"py-spy on the router ({p.get('samples', 0)} samples): {ray:.0%} of samples in Ray, "
            f"Serve and grpc frames, {share.get('speccascade', 0):.0%} in speccascade's own frames "
            f"(on the stack in {p.get('speccascade_on_stack', 0):.0%}), asyncio "
            f"{share.get('asyncio', 0):.0%}")


def _scaling(greedy: dict, name: str, many: int = 8) -> str:
    try:
        a, b = cell(greedy, name, 1), cell(greedy, name, many)
    except KeyError:
        return ""
    return (f"{a['aggregate_tokens_per_s']:.1f} → {b['aggregate_tokens_per_s']:.1f} tok/s; the cores "
            f"were {a.get('cpu_busy_fraction', 0):.0%} busy at 1 stream and "
            f"{b.get('cpu_busy_fraction', 0):.0%} at {many}; rows per forward at {many}: verifier "
            f"{b['mean_batch_size'].get('verifier', 0):.1f}, drafter "
            f"{b['mean_batch_size'].get('drafter', 0):.1f}; CPU per round at {many} (ms): {cpu_line(b)}")


def _controller(table: dict) -> str:
    """At the level where the controller is furthest from the best fixed γ: the γ it chose."""
    def tps(name, n):
        return cell(table, name, n)["aggregate_tokens_per_s"]
    levels = sorted({int(n) for n in table[CONTROLLER]})
    fixed = [name for name in table if name.startswith("γ=")]
    n = min(levels, key=lambda n: tps(CONTROLLER, n) / max(tps(f, n) for f in fixed))
    best = max(fixed, key=lambda f: tps(f, n))
    chosen, best_gamma = cell(table, CONTROLLER, n)["mean_gamma"], int(best.split("=")[1])
    return (f"at {n} stream{'s' * (n > 1)} the controller chose mean γ {chosen:.1f} "
            f"({tps(CONTROLLER, n):.1f} tok/s) where {best} ran {tps(best, n):.1f}; its model of the "
            f"round (the engines' cost fits, per-position acceptance) put the optimum "
            f"{'below' if chosen < best_gamma else 'above'} the best fixed γ")


def explain(results: dict) -> list[str]:
    """One markdown bullet per missed goal."""
    d, plan = results["derived"], results["plan"]
    sweep = results["service"]["sweep"]
    greedy, sampled = sweep["greedy"], sweep["sampled"]
    spec = f"γ={plan['gamma']}"
    one, hop = cell(greedy, spec, 1), results["hop"]
    steps = results["steps_ms"]
    why_prefix = {
        "verifier mean rows per forward": _scaling(greedy, "TARGET"),
        "8 TARGET streams": _scaling(greedy, "TARGET"),
        "8 greedy SPECULATIVE": _scaling(greedy, spec),
        "router CPU per round": f"CPU per round (ms): {cpu_line(one, 8)}. "
                                f"{_profile(results['service'].get('router_profile', {}))}",
        "empty data-path call": (
            f"p99 {hop['idle']['p99_ms']:.2f} ms; under {hop['under_load']['streams']} TARGET "
            f"streams p50 {hop['under_load']['router_to_verifier']:.2f}, p99 "
            f"{hop['under_load']['p99_ms']:.2f} ms; an empty Serve call "
            f"{hop['idle']['serve_call_median_ms']:.2f} ms"),
        "median non-model time": f"{_round(one)}; one empty data-path call costs "
                                 f"{hop['idle']['router_to_verifier']:.2f} ms",
        "1 stream greedy SPECULATIVE: service": (
            f"in process our loop ran {results['in_process']['engine_speculative']['tokens_per_s']:.1f}"
            f" tok/s, the service {one['tokens_per_s']:.1f}: {_round(one)}"),
        "greedy: controller": _controller(greedy),
        "sampled: controller": _controller(sampled),
        "greedy SPECULATIVE": (
            f"steps in process: target {steps['target']:.1f} ms, draft {steps['draft']:.1f}, "
            f"verify(γ+1) {steps['verify']:.1f}; acceptance {one['acceptance_rate']:.2f}; {_round(one)}"),
        "sampled (T 0.8)": (
            f"acceptance {cell(sampled, spec, 1)['acceptance_rate']:.2f} (greedy "
            f"{one['acceptance_rate']:.2f}); {_round(cell(sampled, spec, 1))}"),
    }
    lines = []
    for name, (value, goal, op, issue) in d["goals"].items():
        met = value >= goal if op == "≥" else value <= goal
        if not met:
            why = next((text for prefix, text in why_prefix.items() if name.startswith(prefix)), "")
            lines.append(f"- **{name}** (issue {issue}): {value:.2f}, goal {op} {goal}."
                         + (f" {why}." if why else ""))
    return lines
