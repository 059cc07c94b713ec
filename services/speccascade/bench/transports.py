"""Both data-path transports side by side (issue 23): the same greedy configurations — TARGET,
SPECULATIVE at the plan's fixed γ and the controller — at every stream count, on ipc:// (the main
sweep's cells, measured there) and on tcp (a second service launched here with
`transport.prefer_ipc: false`, the path a multi-node cluster takes), with the tcp hop's p50/p99.
"""
from __future__ import annotations

from tqdm import tqdm

from speccascade.bench import sweep


def configs(plan) -> dict[str, dict]:
    """The three greedy configurations, named as in the sweep (so the ipc cells are shared)."""
    table = sweep.configs((plan.gamma,), False)
    return {name: table[name] for name in ("TARGET", f"γ={plan.gamma}", sweep.CONTROLLER)}


def run_tcp(plan, prompts, service_config, warm_prompt) -> dict:
    """Launch the service on tcp, measure the three configurations once at every stream count,
    and the hop; stops the service."""
    from speccascade.bench.measure import rpc_floor_ms
    from speccascade.client import SpecCascadeClient
    from speccascade.serve import launch

    table = configs(plan)
    address = launch.start(service_config)
    try:
        with SpecCascadeClient(address) as client:
            client.generate(warm_prompt, max_new_tokens=4)  # warm up every deployment
            hop = rpc_floor_ms(launch.APP_NAME, plan.hop_calls, raw_actor=False)
            with tqdm(total=len(table) * len(plan.sweep_streams), desc="service on tcp",
                      unit="cell") as bar:
                cells = sweep.measure(client, plan, prompts, table, plan.sweep_streams, 1, bar)
    finally:
        launch.stop()
    return {"hop": hop, "cells": cells}


def table(results: dict) -> dict[str, dict[str, dict]]:
    """{"ipc" | "tcp": {configuration: {streams: summary}}} from a results dict."""
    plan = results["plan"]
    names = ("TARGET", f"γ={plan['gamma']}", sweep.CONTROLLER)
    greedy = results["service"]["sweep"]["greedy"]
    out = {"ipc": {name: greedy[name] for name in names if name in greedy}}
    if results.get("tcp"):
        out["tcp"] = results["tcp"]["cells"]
    return out
