"""build_app: the one place Serve is applied. Config in, bound application out.

    serve.run(build_app({"verifier": {"num_replicas": 2}}), ...)     # from Python
    serve run deploy/serve.yaml                                      # `args:` = the same dict

Drafter and Verifier are thin front ends to their engine processes (serve.replica); Serve routes
each request's session to the least-loaded replica (its default router) and counts open sessions
for autoscaling. The Router is the ingress of both doors: gRPC (Serve's gRPC proxy calls its
methods by RPC name) and HTTP (serve.http's FastAPI routes through `serve.ingress`). The classes
stay plain Python.
"""
from __future__ import annotations

from ray import serve
from ray.serve import Application

from speccascade.serve.config import ServiceConfig
from speccascade.serve.http import RouterIngress
from speccascade.serve.replica import Drafter, Verifier

# The generated servicer function with a request decoder that reports undecodable fields.
GRPC_SERVICER = "speccascade.serve.ingress.add_GenerationServicer_to_server"
# The standard grpc.health.v1.Health, served by the router too (Check, Watch).
HEALTH_SERVICER = "speccascade.serve.ingress.add_HealthServicer_to_server"
GRPC_SERVICERS = [GRPC_SERVICER, HEALTH_SERVICER]


def build_app(config: "ServiceConfig | dict | None") -> Application:
    """`config`: a ServiceConfig or a dict of its fields (what Serve passes from `args:`).

    One parameter and no pydantic annotation, as Serve requires of an application builder."""
    cfg = ServiceConfig.load(config)
    data = cfg.model_dump()  # plain data crosses to the replicas; each one re-validates it
    models_env = cfg.transport.env_vars(calls_handles=False)
    drafter = serve.deployment(Drafter, name="Drafter").options(
        **cfg.drafter.serve_options(models_env))
    verifier = serve.deployment(Verifier, name="Verifier").options(
        **cfg.verifier.serve_options(models_env))
    router = serve.deployment(RouterIngress, name="Router").options(
        **cfg.router.serve_options(cfg.transport.env_vars(calls_handles=True)))
    return router.bind(drafter.bind(data), verifier.bind(data), data)
