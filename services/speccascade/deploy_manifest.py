"""Render the KubeRay RayService manifest from the one Serve config, and check it offline.

    python -m speccascade.deploy_manifest            # (re)writes deploy/rayservice.yaml
    python -m speccascade.deploy_manifest --check    # exit 1 if it is stale or invalid
    python -m speccascade.deploy_manifest --image REGISTRY/speccascade:TAG --out my-rayservice.yaml

`deploy/serve.yaml` is the single source of the Serve application (what `serve run` runs locally on
CPU). The manifest embeds it as `spec.serveConfigV2` after merging one small, explicit overlay onto
it, `deploy/overlays/gpu.yaml`: model paths on the mounted volume, device and dtype, the custom
resources that pin drafter and verifier replicas to their own GPU worker groups, and autoscaling.
The cluster around it (head and worker groups, image, ports, volumes) is
`deploy/rayservice.template.yaml`, where `serveConfigV2: "@SERVE_CONFIG@"` marks the spot for the
rendered Serve config and `@IMAGE@` the container image. Edit those three files, never the output.

Offline checks (`--check`, tests/test_deploy.py): the manifest equals a fresh render; it validates
against the openAPIV3Schema of the RayService CRD (KubeRay v1.7.0, vendored in deploy/schemas) with
unknown fields rejected, as `kubectl apply` does with strict field validation; the embedded Serve
config validates with Ray's `ServeDeploySchema`, its import paths import, and every application's
`args` validate as `ServiceConfig`.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import functools
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVE_CONFIG = DEPLOY / "serve.yaml"
OVERLAY = DEPLOY / "overlays" / "gpu.yaml"
TEMPLATE = DEPLOY / "rayservice.template.yaml"
MANIFEST = DEPLOY / "rayservice.yaml"
CRD = DEPLOY / "schemas" / "kuberay-v1.7.0" / "ray.io_rayservices.yaml"

BUILDER = "speccascade.serve.app:build_app"
DEFAULT_IMAGE = "registry.example.com/speccascade:0.1.0-gpu"
SERVE_CONFIG_MARK = 'serveConfigV2: "@SERVE_CONFIG@"'
IMAGE_MARK = "@IMAGE@"
OVERLAY_KEYS = {"serve", "args"}


# -- rendering -----------------------------------------------------------------------------------
def deep_merge(base: Any, overlay: Any) -> Any:
    """`overlay` onto `base`: mappings merge key by key, anything else (lists, scalars, null)
    replaces. Neither input is modified."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = copy.deepcopy(base)
        for key, value in overlay.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(overlay)


def load_overlay(path: Path | None = None) -> dict:
    """The overlay file: `serve:` merges onto the Serve config's top level, `args:` onto the args
    of the application built by speccascade.serve.app:build_app."""
    path = path or OVERLAY
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - OVERLAY_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; "
                         f"an overlay has only {sorted(OVERLAY_KEYS)}")
    return data


def production_serve_config(serve_config: Path | None = None,
                            overlay: Path | None = None) -> dict:
    """deploy/serve.yaml with the overlay applied: the Serve config the cluster runs."""
    serve_config, overlay = serve_config or SERVE_CONFIG, overlay or OVERLAY
    config = yaml.safe_load(Path(serve_config).read_text())
    patch = load_overlay(overlay)
    config = deep_merge(config, {k: v for k, v in (patch.get("serve") or {}).items()
                                 if k != "applications"})
    ours = [app for app in config.get("applications", []) if app.get("import_path") == BUILDER]
    if len(ours) != 1:
        raise ValueError(f"{serve_config}: expected exactly one application with import_path "
                         f"{BUILDER}, found {len(ours)}")
    ours[0]["args"] = deep_merge(ours[0].get("args") or {}, patch.get("args") or {})
    return config


def _block(text: str, indent: int) -> str:
    pad = " " * indent
    return "".join(pad + line if line.strip() else line for line in text.splitlines(True))


def render(serve_config: Path | None = None, overlay: Path | None = None,
           template: Path | None = None, image: str = DEFAULT_IMAGE) -> str:
    """The manifest text: the template with the production Serve config and the image filled in."""
    serve_config, overlay = serve_config or SERVE_CONFIG, overlay or OVERLAY
    template = template or TEMPLATE
    config = production_serve_config(serve_config, overlay)
    body = (f"# Rendered from {_rel(serve_config)} + {_rel(overlay)} "
            f"by `python -m speccascade.deploy_manifest`.\n"
            + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100))
    text = Path(template).read_text()
    lines = [line for line in text.splitlines() if line.strip() == SERVE_CONFIG_MARK]
    if len(lines) != 1:
        raise ValueError(f"{template}: needs exactly one line `{SERVE_CONFIG_MARK}`")
    indent = len(lines[0]) - len(lines[0].lstrip())
    text = text.replace(lines[0], " " * indent + "serveConfigV2: |\n"
                        + _block(body, indent + 2).rstrip("\n"), 1)
    return text.replace(IMAGE_MARK, image)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- offline validation --------------------------------------------------------------------------
def crd_schema(crd: Path | None = None, version: str = "v1") -> dict:
    """The openAPIV3Schema of one version of the RayService CRD."""
    crd = crd or CRD
    doc = yaml.safe_load(Path(crd).read_text())
    for entry in doc["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd} has no version {version}")


def strict(schema: dict) -> dict:
    """A copy of a Kubernetes structural schema in which objects with declared `properties`
    reject other keys. The API server prunes or (strict field validation, kubectl's default)
    rejects unknown fields; plain JSON Schema would silently accept a misspelled one."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if ("additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(sub) for sub in schema[key]]
    return out


@functools.lru_cache(maxsize=4)
def _validator(crd: str):
    import jsonschema

    return jsonschema.Draft7Validator(strict(crd_schema(Path(crd))))


def manifest_errors(manifest: dict, crd: Path | None = None) -> list[str]:
    """Schema violations of a RayService manifest, as readable strings (empty when valid)."""
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayService":
        return [f"expected apiVersion ray.io/v1, kind RayService; got "
                f"{manifest.get('apiVersion')}, {manifest.get('kind')}"]
    validator = _validator(str(crd or CRD))
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))]


def _import(path: str) -> Any:
    """`module:attr` (Serve import_path) or `module.attr` (gRPC servicer function)."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def serve_config_errors(config: dict) -> list[str]:
    """What Ray and our ServiceConfig say about a Serve config (empty when it is deployable)."""
    from ray.serve.schema import ServeDeploySchema

    from speccascade.serve.config import ServiceConfig

    errors = []
    try:
        schema = ServeDeploySchema.model_validate(config)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [f"ServeDeploySchema: {exc}"]
    paths = [app.import_path for app in schema.applications]
    paths += list(schema.grpc_options.grpc_servicer_functions or [])
    for path in paths:
        try:
            _import(path)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"import {path}: {type(exc).__name__}: {exc}")
    for app in schema.applications:
        if app.import_path == BUILDER:
            try:
                ServiceConfig.load(app.args or {})
            except Exception as exc:  # noqa: BLE001
                errors.append(f"application {app.name} args: {exc}")
    return errors


def check(manifest_path: Path | None = None, **render_kwargs) -> list[str]:
    """Everything `--check` reports: staleness, CRD schema, Serve config."""
    manifest_path = manifest_path or MANIFEST
    expected = render(**render_kwargs)
    actual = Path(manifest_path).read_text() if Path(manifest_path).exists() else ""
    problems = []
    if actual != expected:
        diff = "".join(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                            str(manifest_path), "rendered", n=1))
        problems.append(f"{_rel(manifest_path)} is stale; run `python -m "
                        f"speccascade.deploy_manifest` to regenerate it:\n{diff}")
    manifest = yaml.safe_load(actual or expected)  # what would be applied
    problems += [f"CRD schema: {e}" for e in manifest_errors(manifest)]
    problems += serve_config_errors(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speccascade.deploy_manifest",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="verify the manifest is up to date and valid; write nothing")
    parser.add_argument("--out", type=Path, help=f"default: {_rel(MANIFEST)}")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="container image of every pod")
    parser.add_argument("--serve-config", type=Path, help=f"default: {_rel(SERVE_CONFIG)}")
    parser.add_argument("--overlay", type=Path, help=f"default: {_rel(OVERLAY)}")
    parser.add_argument("--template", type=Path, help=f"default: {_rel(TEMPLATE)}")
    args = parser.parse_args(argv)
    if args.serve_config is None and not SERVE_CONFIG.exists():
        parser.error(f"{SERVE_CONFIG} not found: run from a source checkout of speccascade")
    args.out = args.out or MANIFEST
    sources = dict(serve_config=args.serve_config, overlay=args.overlay,
                   template=args.template, image=args.image)
    if args.check:
        problems = check(args.out, **sources)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{_rel(args.out)}: up to date and valid")
        return 1 if problems else 0
    args.out.write_text(render(**sources))
    print(f"wrote {_rel(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
