"""Builds the Ray Serve application from one typed config.

`serve run configs/cluster.yaml` imports `raylight.cluster.app:build_app` and passes the
file's `args:`; `raylight serve` builds the same `AppConfig` from flags. `serve run
configs/cluster-disagg.yaml` imports `build_disagg_app` (a `DisaggAppConfig`: a prefill pool and a
decode pool behind a router, cluster/disagg.py).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylight.cluster.autoscaling import serve_autoscaling_config
from raylight.cluster.kv_index import RoutingConfig
from raylight.config import EngineArgs
from raylight.placement import ClusterTopology, PlacementPlan, check_fits, deployment_options, plan_for_replica

logger = logging.getLogger("raylight.app")


class PoolConfig(BaseModel):
    """One engine pool: its replicas' engine arguments, count and resources."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    engine_args: dict[str, Any] = Field(default_factory=dict, description="EngineArgs for every replica.")
    num_replicas: Optional[int] = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling).")
    autoscaling_config: Optional[dict[str, Any]] = Field(None, description=(
        "Serve autoscaling for the engine pool (Serve's keys); with an `slo` section (ttft_p90_s, itl_p90_s, "
        "max_waiting_per_replica, max_kv_usage) the pool scales on those targets (cluster/autoscaling.py)."))
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1},
                                              description="Resources of one engine replica.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Serve's in-flight cap per engine replica.")
    max_queued_requests: Optional[int] = Field(256, ge=0, description="Waiting requests before 429.")
    max_stream_messages_per_s: Optional[float] = Field(500.0, gt=0, description=(
        "Output messages per second one engine replica sends to all its streams together; past it each "
        "stream's tokens are merged into fewer, larger messages (each costs the replica 0.25-0.6 ms of CPU on Ray "
        "Serve, beside the engine). A stream's first and last tokens are never held. None: one message per "
        "token step."))
    gil_switch_interval_s: Optional[float] = Field(None, gt=0, description=(
        "The engine replica process's GIL switch interval (sys.setswitchinterval; None: Python's 5 ms). Its engine "
        "thread shares the GIL with Serve's event loop: when the thread gives the GIL up (waiting for the device) "
        "it gets it back only once the loop releases it or has run this long, and the loop waits as long for a "
        "thread launching a step. A knob to measure, not yet a tuned default: on 2 CPU cores 0.5 ms and 5 ms "
        "served the same within noise; no GPU run has tried it."))
    engine_process: Optional[bool] = Field(None, description=(
        "Run each replica's engine in a process of its own (true) or on a thread of the replica's process "
        "(false). In one process the engine's step loop shares the GIL with Serve's event loop, which streams "
        "every output; its own process gives it its own (with tensor/pipeline parallelism that process joins "
        "the Ray cluster and starts the other ranks' actors in the replica's placement group). None: its own "
        "process on a GPU, a thread on CPU."))
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description=(
        "How a request picks a replica of this pool: Serve's default, or kv_aware (cluster/kv_router.py)."))

    @field_validator("autoscaling_config")
    @classmethod
    def _check_autoscaling(cls, v):
        serve_autoscaling_config(v)  # a bad target or Serve key fails here, with its name
        return v


class ServerConfig(BaseModel):
    """What every application has: the model, the HTTP front end, the request guards."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = Field(None, description="Model to serve; None for the default SmolLM2-135M-Instruct.")
    served_model_name: Optional[str] = Field(None, description="Name clients use; defaults to the model's.")
    max_constructor_retry_count: int = Field(
        3, ge=1, description="Failed engine-replica starts (a bad model path, bad engine args) before Serve marks "
        "the application DEPLOY_FAILED and stops retrying (Serve's deployment option of that name, default 20; "
        "Serve also caps it at 3 per replica).")
    ingress_replicas: int = Field(1, ge=1, description=(
        "Replicas of the HTTP ingress (parsing, validation, tokenizing, chat templates, SSE), each a process of "
        "its own that Serve's proxy spreads requests over; the ingress is one process's GIL per request."))
    gc_freeze: bool = Field(True, description=(
        "Once started, the ingress, each engine replica and its engine process move their start-up objects out "
        "of Python's cyclic garbage collector (utils/gc_heap.py): a full collection of them paused a process "
        "for ~0.1 s every few seconds under load. false: leave the collector as Python has it."))
    serve_fast_path: bool = Field(True, description=(
        "Our deployments (ingress, engine replicas, disaggregated router) run their code on Serve's own event "
        "loop, route their handle calls on it, and call each other over gRPC instead of Ray object refs: the "
        "part of Ray Serve's throughput mode a deployment can take by itself (cluster/serve_mode.py; Serve's "
        "proxy, direct ingress and HAProxy follow the cluster's environment). false: Serve's defaults."))
    api_key: Optional[str] = Field(None, description="Bearer key required on every route but /health.")
    api_keys: list[str] = Field(default_factory=list, description=(
        "More bearer keys (tenants), beside api_key. Each key gets its own prefix-cache salt (a keyed hash of "
        "the key), so one tenant cannot time another's prompts through the prefix cache."))
    max_request_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description=(
        "Largest request body accepted; a larger one gets 413 before it is read whole (Content-Length "
        "checked first, chunked bodies counted as they arrive)."))
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    tool_call_parser: Optional[Literal["hermes", "llama3_json"]] = Field(None, description=(
        "How tool calls are read out of the model's text for tool_choice 'auto' (vLLM's names): hermes "
        "(<tool_call>{...}</tool_call>, Qwen/Hermes/SmolLM-style) or llama3_json (Llama 3.x JSON calls). None: "
        "requests with tools need tool_choice 'required', 'none' or a named function (those are constrained "
        "by a JSON-schema grammar and need no parser)."))
    request_timeout_s: Optional[float] = Field(
        None, gt=0, description="Deadline of a whole request (queued, waiting and running) from its arrival at "
        "the engine replica, like Ray Serve's request_timeout_s: past it the engine aborts the request, frees its "
        "KV blocks, and the client gets 504 (a streamed one an error event). None: no deadline.")
    health_stall_s: float = Field(
        60.0, ge=2, description="An engine step that has not finished after this many seconds marks the replica "
        "unhealthy for good: /health answers 503, its waiting and new requests fail with 503, and Serve's health "
        "check replaces it (the idle engine loop marks progress every second, hence at least 2).")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="On shutdown (SIGTERM, upgrade, scale-down) running requests may finish for this "
        "long (Serve's graceful_shutdown_timeout_s); new ones get 503, those left are aborted.")


class AppConfig(ServerConfig, PoolConfig):
    """The colocated application: one engine pool behind the ingress."""

    @model_validator(mode="after")
    def _check_engine_args(self):
        # Here, not first in build_app: `raylight serve` builds this before it starts Ray, and a bad
        # combination (enable_eplb without enable_expert_parallel, ...) must fail then, with EngineArgs' words.
        if "model" in self.engine_args:
            raise ValueError("engine_args: set the model once, with the top-level `model`")
        engine_args_checked(lambda: self.engine())
        return self

    def engine(self) -> EngineArgs:
        return EngineArgs(model=self.model, **self.engine_args)


def engine_args_checked(make: Callable[[], EngineArgs], where: str = "engine_args") -> EngineArgs:
    """`make()` (an EngineArgs), its validation errors re-raised as one ValueError that names `where` and
    each field with EngineArgs' own message (a nested pydantic error would otherwise read as the
    outer model's)."""
    try:
        return make()
    except ValidationError as e:
        raise ValueError(f"{where}: " + "; ".join(_problem(err) for err in e.errors())) from None


def _problem(err: dict[str, Any]) -> str:
    """One pydantic error as "field: message" ("message" alone for a check across fields)."""
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = ".".join(map(str, err["loc"]))
    return f"{loc}: {msg}" if loc else msg


class DisaggAppConfig(ServerConfig):
    """The disaggregated application: the ingress, a router, a prefill pool and a decode pool."""

    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "EngineArgs shared by both pools; a pool's own engine_args override them key by key."))
    prefill: PoolConfig = Field(default_factory=PoolConfig, description="The prefill pool (computes prompt KV).")
    decode: PoolConfig = Field(default_factory=PoolConfig, description="The decode pool (streams the answers).")
    remote_prefill_threshold: int = Field(512, ge=0, description=(
        "Prompts whose part not already in the decode replica's prefix cache is shorter than this many tokens "
        "are prefilled on the decode replica itself; longer ones on a prefill replica."))
    kv_transfer_timeout_s: float = Field(30.0, gt=0, description=(
        "Longest wait for a prefill replica to compute and push a prompt's KV (also bounded by the decode "
        "replica's kv_lease_s); past it the decode replica prefills locally."))
    prefill_probe_s: float = Field(2.0, gt=0, description=(
        "After a prefill call fails, how often the router probes the prefill pool (decode replicas prefill "
        "locally until it answers)."))

    @model_validator(mode="after")
    def _check_pools(self):
        for role in ("prefill", "decode"):
            if "model" in getattr(self, role).engine_args or "model" in self.engine_args:
                raise ValueError(f"{role}.engine_args: set the model once, with the top-level `model`")
        p = engine_args_checked(lambda: self.engine("prefill"), "prefill.engine_args")
        d = engine_args_checked(lambda: self.engine("decode"), "decode.engine_args")
        for key in ("block_size", "dtype", "load_format", "revision"):
            if getattr(p, key) != getattr(d, key):
                raise ValueError(f"prefill.engine_args.{key} ({getattr(p, key)!r}) must equal "
                                 f"decode.engine_args.{key} ({getattr(d, key)!r}): the pools share KV blocks")
        return self

    def engine(self, role: str) -> EngineArgs:
        """The EngineArgs of the `role` pool ("prefill" or "decode"), with its KV role."""
        args = {**self.engine_args, **getattr(self, role).engine_args}
        if "kv_role" in EngineArgs.model_fields:
            args.setdefault("kv_role", role)
        return EngineArgs(model=self.model, **args)


def build_app(args: dict[str, Any]):
    """Serve application builder: ingress deployment in front of a pool of engine replicas. Each
    ingress replica builds its own FastAPI app with this config's API key (nothing module-level).
    Args with a `prefill` or `decode` pool build the disaggregated application (`build_disagg_app`)."""
    from raylight.cluster.replica import EngineReplica

    if isinstance(args, DisaggAppConfig) or (isinstance(args, dict) and ("prefill" in args or "decode" in args)):
        return build_disagg_app(args)
    cfg = args if isinstance(args, AppConfig) else AppConfig(**(args or {}))
    engine_args = cfg.engine()  # validate once, here, with field names in the error
    pool = _engine_pool(EngineReplica, "EngineReplica", cfg, cfg, engine_args)
    return _ingress(cfg, pool, engine_args)


def build_disagg_app(args: dict[str, Any]):
    """Serve application builder of disaggregated serving (`serve run configs/cluster-disagg.yaml`): the
    same ingress in front of a router (cluster/disagg.py) that streams each request from the decode pool
    and has the prefill pool compute long prompts' KV and push it to the decode replica."""
    from ray import serve

    from raylight.cluster.disagg import DisaggRouter, TargetedRequestRouter
    from raylight.cluster.roles import DecodeReplica, PrefillReplica

    cfg = args if isinstance(args, DisaggAppConfig) else DisaggAppConfig(**(args or {}))
    prefill_args, decode_args = cfg.engine("prefill"), cfg.engine("decode")
    extra: dict[str, Any] = {}
    if TargetedRequestRouter is not None and cfg.decode.routing.policy != "kv_aware":  # (kv_aware targets too)
        from ray.serve.config import RequestRouterConfig

        extra["request_router_config"] = RequestRouterConfig(request_router_class=TargetedRequestRouter)
    decode = _engine_pool(DecodeReplica, "DecodeReplica", cfg, cfg.decode, decode_args, **extra)
    prefill = _engine_pool(PrefillReplica, "PrefillReplica", cfg, cfg.prefill, prefill_args)
    router = serve.deployment(DisaggRouter, name="DisaggRouter",
                              ray_actor_options=with_serve_env({"num_cpus": 0}, cfg),
                              max_ongoing_requests=4096, max_constructor_retry_count=cfg.max_constructor_retry_count)
    return _ingress(cfg, router.bind(decode, prefill, cfg.remote_prefill_threshold, cfg.kv_transfer_timeout_s,
                                     cfg.prefill_probe_s), decode_args)


def with_serve_env(ray_actor_options: dict[str, Any], cfg: ServerConfig) -> dict[str, Any]:
    """`ray_actor_options` with the replica-level settings of `cfg.serve_fast_path` in its runtime_env's
    env_vars (a variable the options set already keeps their value)."""
    from raylight.cluster.serve_mode import REPLICA_FAST_ENV

    if not cfg.serve_fast_path:
        return ray_actor_options
    runtime_env = dict(ray_actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**REPLICA_FAST_ENV, **(runtime_env.get("env_vars") or {})}
    return {**ray_actor_options, "runtime_env": runtime_env}


def _engine_pool(cls, name: str, cfg: ServerConfig, pool: PoolConfig, engine_args: EngineArgs, **options):
    """A bound deployment of engine replicas (`cls`: EngineReplica or a role of it) for `pool`."""
    from ray import serve

    opts: dict[str, Any] = dict(ray_actor_options=pool.ray_actor_options,
                                max_ongoing_requests=pool.max_ongoing_requests,
                                health_check_period_s=10, health_check_timeout_s=60,
                                graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s)
    if pool.autoscaling_config:
        opts["autoscaling_config"] = serve_autoscaling_config(pool.autoscaling_config)
    else:
        opts["num_replicas"] = pool.num_replicas
    opts["max_constructor_retry_count"] = cfg.max_constructor_retry_count
    plan = replica_plan(pool, engine_args)
    if plan is not None:
        opts.update(deployment_options(plan, pool.ray_actor_options))
    if pool.routing.policy == "kv_aware":  # the engines publish KV events; the pool gets our request router
        from raylight.cluster.kv_router import request_router_config

        engine_args = engine_args.model_copy(update={"enable_kv_events": True})
        opts["request_router_config"] = request_router_config(pool.routing, engine_args.block_size)
    opts.update(options)
    opts["ray_actor_options"] = with_serve_env(opts["ray_actor_options"], cfg)
    cpu_threads = int(pool.ray_actor_options.get("num_cpus", 1) or 1)
    return serve.deployment(cls, name=name, **opts).bind(
        engine_args.model_dump(exclude_none=True), pool.max_queued_requests, cpu_threads, plan,
        cfg.request_timeout_s, cfg.health_stall_s, pool.max_stream_messages_per_s, pool.gil_switch_interval_s,
        pool.engine_process, cfg.gc_freeze)


def _ingress(cfg: ServerConfig, engine, engine_args: EngineArgs):
    from ray import serve

    from raylight.cluster.ingress import OpenAIIngress
    from raylight.defaults import DEFAULT_MODEL_NAME

    name = cfg.served_model_name or (cfg.model or DEFAULT_MODEL_NAME)
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress",
                               ray_actor_options=with_serve_env({"num_cpus": 0}, cfg),
                               num_replicas=cfg.ingress_replicas, max_ongoing_requests=4096,
                               max_constructor_retry_count=cfg.max_constructor_retry_count)
    return ingress.bind(engine, name, cfg.model, engine_args.load_format, engine_args.max_model_len, cfg.api_key,
                        cfg.default_max_tokens, api_keys=cfg.api_keys,
                        max_request_body_bytes=cfg.max_request_body_bytes, tool_call_parser=cfg.tool_call_parser,
                        share_metrics=cfg.ingress_replicas > 1, gc_freeze=cfg.gc_freeze)


def placement_options(cfg: PoolConfig, engine_args: EngineArgs) -> dict[str, Any]:
    """Placement-group options for the engine pool: none for a single-rank replica; for
    TP x PP > 1, the planner's bundles and strategy, with `ray_actor_options` read as one
    rank's share (the replica actor is rank 0)."""
    plan = replica_plan(cfg, engine_args)
    return {} if plan is None else deployment_options(plan, cfg.ray_actor_options)


def replica_plan(cfg: PoolConfig, engine_args: EngineArgs) -> Optional[PlacementPlan]:
    """The placement plan of each engine replica, None for a single-rank one. The replica gets it
    too: it places its other ranks (Ray actors) into the bundles the plan says. Under expert
    parallelism the EP ranks are the TP ranks (EP size = tensor_parallel_size, per stage under PP):
    the same bundles, the plan says so."""
    tp, pp = engine_args.tensor_parallel_size, engine_args.pipeline_parallel_size
    if tp * pp == 1:
        return None
    plan = plan_for_replica(cfg.ray_actor_options, tp, pp, device=engine_args.device,
                            expert_parallel=engine_args.enable_expert_parallel)
    logger.info("engine replicas are placement groups %s", plan.description)
    _warn_if_cluster_too_small(plan, cfg)
    return plan


def _warn_if_cluster_too_small(plan: PlacementPlan, cfg: PoolConfig) -> None:
    """A placement group that does not fit waits silently, so say so now. Only a warning:
    an autoscaling Ray cluster may still add the nodes."""
    try:
        import ray

        if not ray.is_initialized():
            return
        replicas = cfg.num_replicas or 1
        if cfg.autoscaling_config:
            replicas = cfg.autoscaling_config.get("min_replicas", 1)
        check_fits(plan, ClusterTopology.from_ray(), max(1, int(replicas)))
    except ValueError as e:
        logger.warning("the Ray cluster cannot hold the engine pool as it is now (%s); replicas will wait "
                       "for nodes", e)
    except Exception:  # topology is advisory; never fail the build over it
        logger.debug("could not read the Ray cluster's topology", exc_info=True)
