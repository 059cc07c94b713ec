"""ServiceConfig: the one typed configuration of the service.

Everything an operator sets lives here — model paths (the only place models are loaded from; no
request field can name a model), devices and dtypes, γ defaults and request limits, and per
deployment the replica count or autoscaling, concurrency and Ray resources. `build_app` turns it
into a Serve application; `deploy/serve.yaml` passes the same fields as the builder's `args`.
Unknown keys are errors, so a typo in a YAML file fails at deploy time instead of being ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from speccascade.engine.defaults import DEFAULT_DRAFT_AHEAD_WASTE_COST, DEFAULT_DRAFT_TOP_K

# "auto": bfloat16 where the device computes it natively and it measured faster, else float32.
Dtype = Literal["auto", "float32", "bfloat16", "float16", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One checkpoint. `path=None` is the embedded default pair."""
    path: str | None = None
    dtype: Dtype = "auto"
    device: str = "cpu"


class ActorOptions(_Strict):
    # Fractional CPUs let all replicas share a small machine; Ray only uses them for placement.
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)


class DeploymentSpec(_Strict):
    """Serve options of one deployment. Set `num_replicas` or `autoscaling_config`, not both."""
    num_replicas: PositiveInt | None = 1
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: PositiveInt = 64
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    torch_threads: PositiveInt = 1          # per replica; >1 only when cores are reserved for it
    # How soon Serve notices a dead replica and stops routing to it (fail-over latency).
    health_check_period_s: float = Field(2.0, gt=0)
    # Serve's access log writes a line per call: thousands per second between router and models.
    access_log: bool = False
    # Drafter/verifier engines: calls that arrived while a forward ran join the next one, up to
    # max_batch_size sequences; batch_wait_timeout_s > 0 also waits that long for more.
    max_batch_size: PositiveInt = 16
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _one_scaling_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("autoscaling_config") is not None:
            if data.get("num_replicas") is not None:
                raise ValueError("set num_replicas or autoscaling_config, not both")
            data = {**data, "num_replicas": None}
        return data

    def serve_options(self, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`; `env_vars` go into the runtime_env."""
        actor_options = self.ray_actor_options.model_dump()
        if env_vars:
            actor_options["runtime_env"] = {"env_vars": dict(env_vars)}
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": actor_options,
            "health_check_period_s": self.health_check_period_s,
            "logging_config": {"enable_access_log": self.access_log},
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas
        return options


class TransportSpec(_Strict):
    """How rounds and requests travel (REFERENCE.md §13). Rounds never cross Serve: a request opens
    one session per side (a Serve streaming call), then talks to that replica's engine over ZMQ."""
    # The engine's ipc:// socket when the router shares its node, else tcp on the node's IP.
    # False: always tcp (what a multi-node cluster uses; the tests check both).
    prefer_ipc: bool = True
    # RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in every deployment: user code on the replica's
    # main loop (no hop between loops).
    user_code_on_main_loop: bool = True
    # RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 in the router: its handles route on its own loop.
    router_on_main_loop: bool = True

    def env_vars(self, calls_handles: bool) -> dict[str, str]:
        """Replica env vars (read when the replica imports Serve; set through runtime_env)."""
        env = {}
        if self.user_code_on_main_loop:
            env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
        if calls_handles and self.router_on_main_loop:
            env["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] = "0"
        return env


class ServiceConfig(_Strict):
    # -- models ------------------------------------------------------------------------------
    target: ModelSpec = Field(default_factory=ModelSpec)
    draft: ModelSpec = Field(default_factory=ModelSpec)
    # -- request defaults and limits (violations answer INVALID_ARGUMENT) ---------------------
    # γ when the request says 0; null = the speculation controller picks γ ∈ [0, controller_max_
    # num_draft_tokens] every round (engine.controller).
    default_num_draft_tokens: PositiveInt | None = None
    max_num_draft_tokens: PositiveInt = 16
    controller_max_num_draft_tokens: PositiveInt = 8  # γmax of the controller
    max_new_tokens: PositiveInt = 512             # cap on a request's max_new_tokens
    max_prompt_tokens: PositiveInt = 2048         # also bounded by the model context
    max_stop_strings: int = Field(8, ge=0)
    max_stop_string_chars: PositiveInt = 128
    max_message_bytes: PositiveInt = 1 << 20      # a serialized GenerateRequest
    # -- capacity (beyond them RESOURCE_EXHAUSTED, never an out-of-memory crash) --------------
    max_live_seqs: PositiveInt = 64               # KV entries per drafter/verifier replica
    # KV budget per drafter/verifier replica in tokens, preallocated at start as slots of the
    # model context (null: max_live_seqs slots); a new sequence finding no free slot is refused.
    kv_cache_tokens: PositiveInt | None = None
    router_queue_cap: PositiveInt = 256           # requests in flight per router replica
    # A KV entry unused this long is dropped: its router died mid-request (a live request touches
    # its entries every round; if one is dropped anyway, the next call simply re-prefills).
    kv_idle_evict_s: float = Field(600.0, gt=0)
    # -- deadlines: Serve's gRPC proxy cancels the router's call when the client's deadline passes
    # or the client cancels (measured, see SECURITY.md); this caps requests that set no deadline.
    request_timeout_s: float = Field(600.0, gt=0)
    # -- fail-over: retries of one drafter/verifier call after its replica died ---------------
    replica_retry_attempts: int = Field(5, ge=0)
    replica_retry_backoff_s: float = Field(0.2, gt=0)
    # -- network -----------------------------------------------------------------------------
    grpc_port: int = Field(9000, ge=1, le=65535)
    # Serve 2.60's gRPC proxy always listens on [::]; when `host` is a loopback address the router
    # additionally refuses peers that are not loopback (PERMISSION_DENIED). See SECURITY.md.
    host: str = "127.0.0.1"
    # The OpenAI-compatible HTTP API (serve.http). Locally Serve's HTTP proxy listens on [::]
    # (IPv4 too) and, with a loopback `host`, the router refuses non-loopback clients (403).
    http_port: int = Field(8000, ge=1, le=65535)
    served_model_name: str = "speccascade"        # the one model id of GET /v1/models
    # -- deployments -------------------------------------------------------------------------
    drafter: DeploymentSpec = Field(default_factory=DeploymentSpec)
    verifier: DeploymentSpec = Field(default_factory=DeploymentSpec)
    router: DeploymentSpec = Field(default_factory=lambda: DeploymentSpec(
        max_ongoing_requests=512, ray_actor_options=ActorOptions(num_cpus=0.25)))
    # -- data path ---------------------------------------------------------------------------
    transport: TransportSpec = Field(default_factory=TransportSpec)
    # Sampled rounds ship the draft's q truncated to its top k tokens (q′, what it samples from).
    # 256 keeps acceptance within 0.01 of the full q at T 0.8 on the default pair (README).
    draft_top_k: int = Field(DEFAULT_DRAFT_TOP_K, ge=1)
    # Share of a discarded draft-ahead's compute that delays verification: 0 = drafter on its own
    # device (always draft ahead), 1 = fully shared cores (draft ahead only when likely used).
    draft_ahead_waste_cost: float = Field(DEFAULT_DRAFT_AHEAD_WASTE_COST, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "ServiceConfig":
        for name in ("default_num_draft_tokens", "controller_max_num_draft_tokens"):
            if (getattr(self, name) or 0) > self.max_num_draft_tokens:
                raise ValueError(f"{name} ({getattr(self, name)}) exceeds "
                                 f"max_num_draft_tokens ({self.max_num_draft_tokens})")
        if self.router.max_ongoing_requests < self.router_queue_cap:
            raise ValueError("router.max_ongoing_requests must be >= router_queue_cap, so the "
                             "router itself answers RESOURCE_EXHAUSTED when full")
        for role in ("drafter", "verifier"):
            spec: DeploymentSpec = getattr(self, role)
            if spec.max_ongoing_requests < spec.max_batch_size:
                raise ValueError(f"{role}.max_ongoing_requests must be >= {role}.max_batch_size")
            # A live sequence holds one session (one ongoing request) on its replica: a replica
            # that accepts more sessions than its KV budget holds would refuse their first call.
            if spec.max_ongoing_requests < self.max_live_seqs:
                raise ValueError(f"{role}.max_ongoing_requests ({spec.max_ongoing_requests}) must "
                                 f"be >= max_live_seqs ({self.max_live_seqs}): each live "
                                 f"sequence holds one session on its replica")
        return self

    def model_paths(self) -> tuple[Path, Path]:
        """(target_dir, draft_dir), resolving unset paths to the embedded default pair."""
        from speccascade.models.loader import default_pair_paths  # torch: not in front ends

        default_target, default_draft = default_pair_paths()
        return (Path(self.target.path) if self.target.path else default_target,
                Path(self.draft.path) if self.draft.path else default_draft)

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    @classmethod
    def load(cls, source: "ServiceConfig | dict | str | Path | None" = None,
             **overrides: Any) -> "ServiceConfig":
        """From a ServiceConfig, a dict, or a YAML file (its top level, or its `args:` key when it
        is a Serve config file); `overrides` win over the source."""
        if isinstance(source, ServiceConfig):
            data = source.model_dump()
        elif isinstance(source, (str, Path)):
            import yaml

            data = yaml.safe_load(Path(source).read_text()) or {}
            if "applications" in data:  # a Serve config: take our application's args
                data = data["applications"][0].get("args") or {}
        else:
            data = dict(source or {})
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
