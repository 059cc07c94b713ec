"""build_app: the one place Serve is applied. Config in, bound application out.

    serve.run(build_app({"verifier": {"num_replicas": 2}}), ...)     # from Python
    serve run deploy/serve.yaml                                      # `args:` = the same dict

Drafter and Verifier route with Ray's ConsistentHashRouter on the request id (KV-cache affinity);
the Router is the ingress of both doors: gRPC (Serve's gRPC proxy calls its methods by RPC name)
and HTTP (serve.http's FastAPI routes through `serve.ingress`). The classes stay plain Python. The
transport options (`ServiceConfig.transport`) become replica env vars here and handle options in
serve.remote.
"""
from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from speccascade.serve.config import CONSISTENT_HASH_ROUTER, ServiceConfig
from speccascade.serve.drafter import Drafter
from speccascade.serve.http import RouterIngress
from speccascade.serve.verifier import Verifier

# The generated servicer function with a request decoder that reports undecodable fields.
GRPC_SERVICER = "speccascade.serve.ingress.add_GenerationServicer_to_server"
# The standard grpc.health.v1.Health, served by the router too (Check, Watch).
HEALTH_SERVICER = "speccascade.serve.ingress.add_HealthServicer_to_server"
GRPC_SERVICERS = [GRPC_SERVICER, HEALTH_SERVICER]


def _affinity(config: ServiceConfig) -> RequestRouterConfig:
    return RequestRouterConfig(
        request_router_class=CONSISTENT_HASH_ROUTER,
        request_router_kwargs={"num_fallback_replicas": config.num_fallback_replicas})


def build_app(config: "ServiceConfig | dict | None") -> Application:
    """`config`: a ServiceConfig or a dict of its fields (what Serve passes from `args:`).

    One parameter and no pydantic annotation, as Serve requires of an application builder."""
    cfg = ServiceConfig.load(config)
    data = cfg.model_dump()  # plain data crosses to the replicas; each one re-validates it
    models_env = cfg.transport.env_vars(calls_handles=False)
    drafter = serve.deployment(Drafter, name="Drafter").options(
        **cfg.drafter.serve_options(models_env), request_router_config=_affinity(cfg))
    verifier = serve.deployment(Verifier, name="Verifier").options(
        **cfg.verifier.serve_options(models_env), request_router_config=_affinity(cfg))
    router = serve.deployment(RouterIngress, name="Router").options(
        **cfg.router.serve_options(cfg.transport.env_vars(calls_handles=True)))
    return router.bind(drafter.bind(data), verifier.bind(data), data)
