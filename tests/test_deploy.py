"""Offline checks of the Kubernetes deployment (deploy/): no cluster, no Docker, no Ray started.

The RayService manifest validates against the CRD of KubeRay v1.7.0 (unknown fields rejected, as
`kubectl apply` does) and can fail; it is exactly deploy/serve.yaml + deploy/overlays/gpu.yaml; the
embedded Serve config passes Ray's own schema, its import paths import and its args are a valid
ServiceConfig; the Ray autoscaler's own reading of the worker groups puts drafter and verifier
replicas on different groups; the image builds from what the Docker context holds.
"""
from __future__ import annotations

import copy
import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from speccascade import deploy_manifest as dm

ROOT = dm.ROOT


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(dm.MANIFEST.read_text())


@pytest.fixture(scope="module")
def serve_config(manifest) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def app_args(serve_config) -> dict:
    [app] = [a for a in serve_config["applications"] if a["import_path"] == dm.BUILDER]
    return app["args"]


def groups(manifest) -> dict[str, dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"],
            **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


# -- the manifest is generated from the one Serve config ------------------------------------------
def test_manifest_is_not_stale():
    assert dm.MANIFEST.read_text() == dm.render(), (
        "deploy/rayservice.yaml is stale: run `python -m speccascade.deploy_manifest`")


def test_embedded_serve_config_is_serve_yaml_plus_the_gpu_overlay(serve_config):
    """Checked independently of render(): outside the overlay's keys, every value is serve.yaml's."""
    source = yaml.safe_load(dm.SERVE_CONFIG.read_text())
    overlay = yaml.safe_load(dm.OVERLAY.read_text())

    def expect(base, patch):
        if isinstance(base, dict) and isinstance(patch, dict):
            return {**base, **{k: expect(base.get(k), v) for k, v in patch.items()}}
        return patch

    assert set(overlay) <= {"serve", "args"}
    expected = expect(source, overlay.get("serve") or {})
    for app in expected["applications"]:
        if app["import_path"] == dm.BUILDER:
            app["args"] = expect(app.get("args") or {}, overlay["args"])
    assert serve_config == expected


def test_deep_merge_merges_mappings_and_replaces_everything_else():
    base = {"a": {"x": 1, "y": [1, 2]}, "n": 3, "keep": True}
    patch = {"a": {"y": [3], "z": None}, "n": None}
    assert dm.deep_merge(base, patch) == {"a": {"x": 1, "y": [3], "z": None}, "n": None,
                                          "keep": True}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "n": 3, "keep": True}  # inputs untouched


def test_check_command_detects_a_stale_manifest(tmp_path, capsys):
    out = tmp_path / "rayservice.yaml"
    assert dm.main(["--out", str(out)]) == 0
    assert dm.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("maxReplicas: 4", "maxReplicas: 5"))
    assert dm.main(["--check", "--out", str(out)]) == 1
    assert "stale" in capsys.readouterr().err


# -- the RayService CRD (KubeRay v1.7.0) ----------------------------------------------------------
def test_vendored_crd_is_the_rayservice_crd_with_its_license():
    crd = yaml.safe_load(dm.CRD.read_text())
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == "RayService"
    assert "v1" in [v["name"] for v in crd["spec"]["versions"]]
    assert "Apache License" in (dm.CRD.parent / "LICENSE").read_text()


def test_manifest_validates_against_the_crd_schema(manifest):
    assert dm.manifest_errors(manifest) == []


def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for key in parents:
        node = node[key]
    node[last] = value
    return doc


def _drop(doc: dict, path: str) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for key in parents:
        node = node[key]
    del node[last]
    return doc


WORKER0 = "spec.rayClusterConfig.workerGroupSpecs.0"
HEAD_CONTAINER = "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0"


@pytest.mark.parametrize("breakage, where", [
    (lambda m: _set(m, f"{WORKER0}.minReplica", 1), "'minReplica' was unexpected"),  # typo
    (lambda m: _set(m, "spec.serveConfigV", "x"), "'serveConfigV' was unexpected"),  # typo
    (lambda m: _set(m, f"{HEAD_CONTAINER}.port", []), "'port' was unexpected"),       # pod spec
    (lambda m: _set(m, f"{WORKER0}.rayStartParams.num-gpus", 1), "is not of type 'string'"),
    (lambda m: _set(m, f"{WORKER0}.maxReplicas", "4"), "is not of type 'integer'"),
    (lambda m: _drop(m, f"{WORKER0}.groupName"), "'groupName' is a required property"),
    (lambda m: _set(m, "spec.serveConfigV2", {"applications": []}), "is not of type 'string'"),
    (lambda m: _set(m, "apiVersion", "ray.io/v1alpha2"), "expected apiVersion ray.io/v1"),
    (lambda m: _set(m, f"{WORKER0}.template.spec.containers.0.readinessProbe.grpc",
                    {"service": "speccascade.v1.Generation"}), "'port' is a required property"),
    (lambda m: _set(m, f"{WORKER0}.template.spec.containers.0.readinessProbe.grpc.serivce",
                    "x"), "'serivce' was unexpected"),
])
def test_a_broken_manifest_fails_validation(manifest, breakage, where):
    errors = dm.manifest_errors(breakage(manifest))
    assert any(where in error for error in errors), errors


# -- the embedded Serve config --------------------------------------------------------------------
def test_serve_config_is_deployable(serve_config):
    """Ray's ServeDeploySchema, importable import_path and gRPC servicer, args as ServiceConfig."""
    assert dm.serve_config_errors(serve_config) == []
    from ray.serve.schema import ServeDeploySchema

    from speccascade.serve.app import GRPC_SERVICERS, build_app

    schema = ServeDeploySchema.model_validate(serve_config)
    [app] = schema.applications
    assert app.import_path == dm.BUILDER and dm._import(app.import_path) is build_app
    # speccascade.v1.Generation and grpc.health.v1.Health, as `speccascade serve` registers them
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICERS
    assert all(callable(dm._import(path)) for path in GRPC_SERVICERS)


@pytest.mark.parametrize("breakage, where", [
    (lambda c: _set(c, "applications.0.import_path", "speccascade.serve.app:build_ap"), "import"),
    (lambda c: _set(c, "grpc_options.grpc_servicer_functions", ["speccascade.v1.nope.add_X"]),
     "import speccascade.v1.nope.add_X"),
    (lambda c: _set(c, "applications.0.args.verifer", {}), "args"),              # typo
    (lambda c: _set(c, "applications.0.args.drafter.num_replicas", 2), "args"),  # + autoscaling
    (lambda c: _set(c, "applications", "not a list"), "ServeDeploySchema"),
])
def test_a_broken_serve_config_is_reported(serve_config, breakage, where):
    errors = dm.serve_config_errors(breakage(serve_config))
    assert any(where in error for error in errors), errors


def test_autoscaling_is_configured_for_both_model_deployments(manifest, app_args):
    from ray.serve.config import AutoscalingConfig

    from speccascade.serve.config import ServiceConfig

    config = ServiceConfig.load(app_args)
    for role in ("drafter", "verifier"):
        spec = getattr(config, role)
        assert spec.num_replicas is None and spec.autoscaling_config is not None
        autoscaling = AutoscalingConfig(**spec.autoscaling_config)  # Serve's own validation
        assert 1 <= autoscaling.min_replicas < autoscaling.max_replicas
        assert autoscaling.target_ongoing_requests <= spec.max_ongoing_requests
        assert {"upscale_delay_s", "downscale_delay_s"} <= set(spec.autoscaling_config)
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


# -- placement: the Ray autoscaler's own view of the worker groups --------------------------------
def node_types(manifest) -> dict[str, dict]:
    """What Ray's KubeRay autoscaler derives from the groups (CPU, GPU, memory, custom resources):
    the same parser reads the escaped `resources` rayStartParam on the cluster."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _generate_available_node_types_from_ray_cr_spec)

    return _generate_available_node_types_from_ray_cr_spec(manifest["spec"]["rayClusterConfig"])


def demand(actor_options: dict) -> dict[str, float]:
    wanted = {"CPU": actor_options.get("num_cpus", 0), "GPU": actor_options.get("num_gpus", 0),
              **actor_options.get("resources", {})}
    return {k: v for k, v in wanted.items() if v}


def fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0) >= v for k, v in need.items())


def test_gpu_overlay_puts_drafter_and_verifier_on_their_own_worker_groups(manifest, app_args):
    from speccascade.serve.config import ServiceConfig

    config = ServiceConfig.load(app_args)
    types = node_types(manifest)
    where = {role: {name for name, t in types.items()
                    if fits(demand(getattr(config, role).ray_actor_options.model_dump()),
                            t["resources"])}
             for role in ("drafter", "verifier", "router")}
    assert where["drafter"] == {"drafter-gpu"}
    assert where["verifier"] == {"verifier-gpu"}
    assert "head" not in where["router"] and where["router"]  # routers use GPU pods' spare CPUs
    drafter_res = set(config.drafter.ray_actor_options.resources)
    verifier_res = set(config.verifier.ray_actor_options.resources)
    assert drafter_res and verifier_res and not drafter_res & verifier_res
    for role, group in (("drafter", "drafter-gpu"), ("verifier", "verifier-gpu")):
        spec = getattr(config, role)
        assert spec.ray_actor_options.num_gpus >= 1
        assert (config.target if role == "verifier" else config.draft).device.startswith("cuda")
        # The group can grow to hold Serve's largest replica count, one GPU per replica.
        per_pod = types[group]["resources"]["GPU"] // spec.ray_actor_options.num_gpus
        assert types[group]["max_workers"] * per_pod >= spec.autoscaling_config["max_replicas"]


def test_custom_resources_avoid_the_kuberay_gpu_suffix_trap(manifest):
    """KubeRay turns keys ending in "gpu" of a group's top-level `resources:` field into
    --num-gpus; our custom resources therefore go through the escaped rayStartParam."""
    for name, group in groups(manifest).items():
        assert not any(k.lower().endswith("gpu") for k in group.get("resources", {})), name


# -- gRPC exposure --------------------------------------------------------------------------------
def test_grpc_port_is_exposed_as_serve_grpc(manifest, serve_config, app_args):
    from speccascade.serve.config import ServiceConfig

    port = serve_config["grpc_options"]["port"]
    config = ServiceConfig.load(app_args)
    assert port == config.grpc_port
    assert not config.is_loopback, "a loopback host refuses peers from the cluster network"
    for name, group in groups(manifest).items():
        container = group["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("serve-grpc") == port, name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == 4 * config.max_message_bytes, name


def test_http_port_is_exposed_as_serve(manifest, serve_config, app_args):
    from speccascade.serve.config import ServiceConfig

    port = serve_config["http_options"]["port"]
    assert port == ServiceConfig.load(app_args).http_port
    for name, group in groups(manifest).items():
        container = group["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("serve") == port, name


def test_worker_readiness_is_the_grpc_health_service(manifest, serve_config):
    """Worker pods are ready when the standard gRPC health service says the application serves
    (a Kubernetes gRPC probe); the head keeps KubeRay's default probe, since the operator deploys
    the application only once the head is ready."""
    from speccascade.serve.router import HEALTH_SERVICES

    port = serve_config["grpc_options"]["port"]
    for name, group in groups(manifest).items():
        probe = group["template"]["spec"]["containers"][0].get("readinessProbe")
        if name == "head":
            assert probe is None
            continue
        assert probe["grpc"] == {"port": port, "service": "speccascade.v1.Generation"}, name
        assert probe["grpc"]["service"] in HEALTH_SERVICES
        assert probe["timeoutSeconds"] >= 5  # Check asks a drafter and a verifier replica


def test_kuberay_health_checks_can_reach_the_serve_proxies(serve_config):
    """The operator probes the head's proxy at http://<head pod IP>:8000/-/healthz before adding
    the head to the serve Service, and each worker pod's readiness probe checks a local proxy."""
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    assert serve_config["proxy_location"] == "EveryNode"


def test_model_paths_are_on_the_mounted_volume(manifest, app_args):
    from speccascade.serve.config import ServiceConfig

    config = ServiceConfig.load(app_args)
    for name, group in groups(manifest).items():
        container = group["template"]["spec"]["containers"][0]
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        for spec in (config.target, config.draft):
            assert spec.path and any(Path(spec.path).is_relative_to(m) for m in mounts), name


# -- the image ------------------------------------------------------------------------------------
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Enough of .dockerignore's matching for this repository (no `!` exceptions used)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        variants = {pattern, pattern[3:] if pattern.startswith("**/") else pattern}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            return True
    return False


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "docker_ignored() has no `!` support"
    return patterns


def copied_paths() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def test_dockerfile_base_image_matches_the_ray_pin_and_the_manifest(manifest):
    import ray

    tag = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", DOCKERFILE.read_text(), re.M)
    assert tag, "the Dockerfile builds on the official rayproject/ray image"
    assert tag.group(1).startswith(f"{ray.__version__}-py{sys.version_info[0]}"
                                   f"{sys.version_info[1]}")
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert f"ray[serve]=={ray.__version__}" in (ROOT / "pyproject.toml").read_text()


def test_docker_context_holds_what_the_dockerfile_copies():
    patterns = dockerignore()
    sources = copied_paths()
    assert {"pyproject.toml", "setup.py", "proto", "services"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists() and not docker_ignored(source, patterns), source
    # Generated code never enters the context: the image's build generates its own.
    assert docker_ignored("services/speccascade/v1/generation_pb2_grpc.py", patterns)
    assert not docker_ignored("services/speccascade/v1/__init__.py", patterns)
    assert not docker_ignored("services/speccascade/serve/app.py", patterns)


@pytest.mark.slow
def test_package_build_generates_and_ships_the_grpc_code(tmp_path):
    """What the Dockerfile's `pip install .` does, offline: build the wheel from the Docker
    context (without generated files) and find the gRPC modules Serve's proxy imports."""
    patterns = dockerignore()
    context = tmp_path / "context"
    for source in copied_paths():
        src = ROOT / source
        if src.is_file():
            context.mkdir(exist_ok=True)
            shutil.copy2(src, context / source)
            continue
        for path in src.rglob("*"):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not docker_ignored(rel, patterns):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, context / rel)
    assert not list(context.rglob("*_pb2*.py"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(context)], check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("speccascade-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"speccascade/v1/generation_pb2.py", "speccascade/v1/generation_pb2_grpc.py",
            "speccascade/serve/app.py"} <= names
