"""The Ray Serve service: deployments, gRPC router, config, errors, CLI and client."""
