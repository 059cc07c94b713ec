"""Start and stop the service on a local Ray: what `speccascade serve` and the e2e tests run."""
from __future__ import annotations

import os

from speccascade.serve.app import GRPC_SERVICERS, build_app
from speccascade.serve.config import ServiceConfig

APP_NAME = "speccascade"


def http_host() -> str:
    """Where Serve's HTTP proxy listens: [::], which on Linux also takes IPv4 (so 127.0.0.1, ::1
    and localhost all work), as the gRPC proxy always does; the router checks the client."""
    import socket

    try:  # a kernel without IPv6 cannot bind [::]
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return "0.0.0.0"
    return "::"


def addresses(config: ServiceConfig) -> tuple[str, str]:
    """(gRPC address, HTTP base URL) as a client on this machine writes them."""
    host = "localhost" if config.is_loopback else config.host
    return f"{host}:{config.grpc_port}", f"http://{host}:{config.http_port}/v1"


def start(config: ServiceConfig, *, num_cpus: float | None = None) -> str:
    """Start Ray (no dashboard) and the application; return the gRPC address once it is ready
    (`addresses` gives both)."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    # The proxy's transport limit (Serve reads it at start): above the router's own check, which
    # answers INVALID_ARGUMENT naming the field; only a grossly oversize message is cut here.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(4 * config.max_message_bytes))
    # Replicas import speccascade: make sure they find it like this process does.
    services = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH", "")
    if services not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (services, path) if p)
    # address="local": always a fresh cluster owned by this process, never an existing one.
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, configure_logging=False)
    serve.start(http_options=HTTPOptions(host=http_host(), port=config.http_port),
                grpc_options=gRPCOptions(port=config.grpc_port,
                                         grpc_servicer_functions=GRPC_SERVICERS))
    # A route prefix registers the ingress as an endpoint; with one endpoint, gRPC clients need no
    # `application` metadata (grpcurl works as is).
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"{config.host}:{config.grpc_port}"


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
