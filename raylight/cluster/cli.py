"""`raylight` command line: `generate` (offline, one process) and `prepare-model`.

Engine flags are generated from `EngineArgs`, with vLLM's flag names
(`--max-model-len`, `--max-num-seqs`, `--enable-prefix-caching`, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import Any, Optional, Sequence

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
        elif typing.get_origin(base) is typing.Literal:
            group.add_argument(flag, dest=name, choices=typing.get_args(base), default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=base if base in (int, float) else str, default=None,
                               help=help_text)


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


def _serve(ns: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from raylight.cluster.app import AppConfig, build_app

    engine_args = engine_args_from(ns)
    cfg = AppConfig(
        model=engine_args.pop("model", None), served_model_name=ns.served_model_name, engine_args=engine_args,
        num_replicas=ns.num_replicas, ray_actor_options={"num_cpus": ns.num_cpus, "num_gpus": ns.num_gpus},
        max_queued_requests=ns.max_queued_requests, api_key=ns.api_key, default_max_tokens=ns.default_max_tokens,
    )
    ray.init(address=ns.address, ignore_reinit_error=True)  # starts a local Ray when there is no cluster
    serve.start(http_options={"host": ns.host, "port": ns.port})
    print(f"raylight serving {cfg.model or 'SmolLM2-135M-Instruct'} on http://{ns.host}:{ns.port}/v1", flush=True)
    serve.run(build_app(cfg), name="raylight", route_prefix="/", blocking=True)
    return 0


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
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--num-replicas", type=int, default=1)
    srv.add_argument("--num-cpus", type=float, default=2,
                     help="CPUs of one engine replica (with tensor/pipeline parallelism: of each of its ranks)")
    srv.add_argument("--num-gpus", type=float, default=0,
                     help="GPUs of one engine replica (with tensor/pipeline parallelism: of each of its ranks, "
                     "so at most 1)")
    srv.add_argument("--max-queued-requests", type=int, default=256)
    srv.add_argument("--default-max-tokens", type=int, default=256)
    srv.add_argument("--address", default=None, help="Ray cluster address (default: start or join a local one)")
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


if __name__ == "__main__":
    sys.exit(main())
