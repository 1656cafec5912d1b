"""Builds the Ray Serve application from one typed config.

`serve run configs/cluster.yaml` imports `raylight.cluster.app:build_app` and passes the
file's `args:`; `raylight serve` builds the same `AppConfig` from flags.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from raylight.config import EngineArgs

logger = logging.getLogger("raylight.app")


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = Field(None, description="Model to serve; None for the default SmolLM2-135M-Instruct.")
    served_model_name: Optional[str] = Field(None, description="Name clients use; defaults to the model's.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="EngineArgs for every replica.")
    num_replicas: Optional[int] = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling).")
    autoscaling_config: Optional[dict[str, Any]] = Field(None, description="Serve autoscaling for the engine pool.")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1},
                                              description="Resources of one engine replica.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Serve's in-flight cap per engine replica.")
    max_queued_requests: Optional[int] = Field(256, ge=0, description="Waiting requests before 429.")
    api_key: Optional[str] = Field(None, description="Bearer key required on every route but /health.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")

    def engine(self) -> EngineArgs:
        return EngineArgs(model=self.model, **self.engine_args)


def build_app(args: dict[str, Any]):
    """Serve application builder: ingress deployment in front of a pool of engine replicas."""
    from ray import serve

    from raylight.cluster.ingress import OpenAIServer
    from raylight.cluster.replica import EngineReplica
    from raylight.models.default_model import DEFAULT_MODEL_NAME

    cfg = args if isinstance(args, AppConfig) else AppConfig(**(args or {}))
    engine_args = cfg.engine()  # validate once, here, with field names in the error
    name = cfg.served_model_name or (cfg.model or DEFAULT_MODEL_NAME)
    pool_opts: dict[str, Any] = dict(ray_actor_options=cfg.ray_actor_options,
                                     max_ongoing_requests=cfg.max_ongoing_requests,
                                     health_check_period_s=10, health_check_timeout_s=60)
    if cfg.autoscaling_config:
        pool_opts["autoscaling_config"] = cfg.autoscaling_config
    else:
        pool_opts["num_replicas"] = cfg.num_replicas
    cpu_threads = int(cfg.ray_actor_options.get("num_cpus", 1) or 1)
    pool = serve.deployment(EngineReplica, name="EngineReplica", **pool_opts).bind(
        engine_args.model_dump(exclude_none=True), cfg.max_queued_requests, cpu_threads)
    ingress = serve.deployment(OpenAIServer, name="OpenAIIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=4096)
    return ingress.bind(pool, name, cfg.model, engine_args.load_format, engine_args.max_model_len, cfg.api_key,
                        cfg.default_max_tokens)
