"""Placement, proven locally: drafter and verifier replicas land on the nodes carrying their custom
resources, and generation through Serve's gRPC proxy works across those nodes.

A `ray.cluster_utils.Cluster` simulates the RayService's layout on this machine: a head without
the custom resources and two worker "nodes", one advertising `drafter_gpu`, one `verifier_gpu`
(num_gpus 0: CPU only here). The application is deployed as in production: `build_app` with the
Serve options of speccascade.serve.launch and `ray_actor_options.resources` per deployment, on the
tiny random checkpoints of conftest. Where each replica runs is read from the GCS by the names the
service itself reports (the Stats RPC and each reply's stats.replicas).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.e2e

SERVICES = str(Path(__file__).resolve().parents[1] / "services")
PROMPTS = ["def f1(x):", "def f17(x):\n    return", "    return x * 3", "def f42(x):\n",
           "x * 12 + 5", "def f100(x):\n    return x * 100 + 2"]
MAX_NEW = 16


@pytest.fixture(scope="module")
def cluster(tiny_pair):
    """(client, {"drafter": node_id, "verifier": node_id}) of the service on a 3-node cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from speccascade.client import SpecCascadeClient
    from speccascade.serve import launch
    from speccascade.serve.config import ServiceConfig

    target, draft = tiny_pair
    with pytest.MonkeyPatch.context() as env:
        # The nodes' workers must import speccascade: they inherit this environment.
        env.setenv("PYTHONPATH", os.pathsep.join(
            p for p in (SERVICES, os.environ.get("PYTHONPATH", "")) if p))
        nodes = Cluster(initialize_head=True,
                        head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            # Two "GPUs" each, so that both replicas of a deployment fit on its own node only.
            drafter_node = nodes.add_node(num_cpus=1, resources={"drafter_gpu": 2})
            verifier_node = nodes.add_node(num_cpus=1, resources={"verifier_gpu": 2})
            nodes.wait_for_nodes()

            def replicas(resource: str) -> dict:
                return {"num_replicas": 2, "health_check_period_s": 1.0,
                        "ray_actor_options": {"num_cpus": 0.1, "resources": {resource: 1}}}

            config = ServiceConfig.load({
                # float64: batched and one-at-a-time forwards stay bit-identical (see e2e tests)
                "target": {"path": str(target), "dtype": "float64"},
                "draft": {"path": str(draft), "dtype": "float64"},
                "grpc_port": free_port(), "http_port": free_port(),
                "drafter": replicas("drafter_gpu"), "verifier": replicas("verifier_gpu"),
                "router": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 512}})
            address = start_on(nodes.address, config)
            client = SpecCascadeClient(address, timeout=120)
            try:
                yield client, {"drafter": drafter_node.node_id,
                               "verifier": verifier_node.node_id}
            finally:
                client.close()
                launch.stop()
        finally:
            if ray.is_initialized():
                ray.shutdown()
            nodes.shutdown()


def start_on(cluster_address: str, config) -> str:
    """speccascade.serve.launch.start, but joining an existing cluster (launch.start always
    starts a fresh local Ray). Same Serve options; launch.stop tears it down."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from speccascade.serve.app import GRPC_SERVICER, build_app
    from speccascade.serve.launch import APP_NAME

    ray.init(address=cluster_address, configure_logging=False)
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=config.http_port),
                grpc_options=gRPCOptions(port=config.grpc_port,
                                         grpc_servicer_functions=[GRPC_SERVICER]))
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"{config.host}:{config.grpc_port}"


def node_of(replica: str) -> str:
    """The node id of a Serve replica actor, by the name the service reports, from the GCS
    (ray.util.state needs the dashboard, which these tests do not start)."""
    import ray
    from ray._private import state

    handle = ray.get_actor(replica, namespace="serve")
    return state.actors(actor_id=handle._actor_id.hex())["Address"]["NodeID"]


def test_replicas_run_on_the_nodes_with_their_custom_resource(cluster):
    client, nodes = cluster
    stats = client.stats()
    roles = sorted(r.role for r in stats.replicas)
    assert roles == ["drafter"] * 2 + ["verifier"] * 2, roles
    for replica in stats.replicas:
        assert node_of(replica.replica) == nodes[replica.role], replica


def test_grpc_generation_across_the_nodes_equals_target(cluster):
    client, nodes = cluster
    used = set()
    for prompt in PROMPTS:
        reference = client.generate(prompt, max_new_tokens=MAX_NEW, mode="target")
        for mode in ("speculative", "cascade"):
            reply = client.generate(prompt, max_new_tokens=MAX_NEW, mode=mode, num_draft_tokens=4,
                                    **({"deferral_rule": "chow", "deferral_threshold": 0.0}
                                       if mode == "cascade" else {}))
            assert list(reply.token_ids) == list(reference.token_ids), (prompt, mode)
            assert reply.stats.drafted > 0
            used.update(reply.stats.replicas)
        streamed = list(client.generate_stream(prompt, max_new_tokens=MAX_NEW,
                                               mode="speculative"))
        assert [t for part in streamed for t in part.token_ids] == list(reference.token_ids)
    # The requests' drafter and verifier calls ran on the two worker nodes, not on the head.
    for entry in used:
        role, _, replica = entry.partition(":")
        assert node_of(replica) == nodes[role], entry
    assert {e.partition(":")[0] for e in used} == {"drafter", "verifier"}
