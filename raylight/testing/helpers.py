"""Helpers the tests share: small random HF models, HF greedy references, prompts, leak checks,
and a served app on a free port. They live in the package (not in tests/, which is not importable:
only `raylight` is) so that tests in every folder, and processes they spawn, can import them."""

from __future__ import annotations

import contextlib

import torch

from raylight.utils.ports import free_port  # noqa: F401  (the tests import it from here)

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "To be or not to be,",
    "List three benefits of exercise:\n1.",
]
SMOLLM2_CHAT = [{"role": "user", "content": "Write one sentence about the ocean."}]


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int, stop_at_eos: bool = True) -> list[list[int]]:
    """HF transformers greedy continuations, one prompt at a time (no padding in the reference)."""
    outs = []
    for ids in prompt_ids:
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        if not stop_at_eos:
            kwargs.update(eos_token_id=None, min_new_tokens=max_new_tokens)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             pad_token_id=0, **kwargs)
        outs.append(out[0, len(ids):].tolist())
    return outs


NEAR_TIE = 1e-2  # the bound on HF's top-1 minus our token's exact logit, for any mismatch (the near-tie rule)


@torch.inference_mode()
def near_tie_report(model_dir: str, prompts: list[list[int]], outputs: list[list[int]], device: str = "cuda"):
    """Our greedy bf16 `outputs` against HF teacher-forced on the same prefixes: (matched, total, worst),
    `worst` holding (exact-logit gap between HF's top-1 and our token, HF bf16's own error) per mismatch.
    The rule: every gap below max(NEAR_TIE, 2 x that error), and >= 95% of tokens equal."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    matched = total = 0
    worst = []
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt + list(out)], device=device)
        rows = slice(len(prompt) - 1, -1)
        ref = hf32(ids).logits[0, rows].float()  # the exact order of the candidates
        hf_bf16 = hf(ids).logits[0, rows].float()  # the peer we match: HF in the same precision
        noise = (hf_bf16 - ref).abs().max(dim=-1).values  # how far HF's own bf16 run strays from fp32
        hf_top = hf_bf16.argmax(dim=-1)
        for step, token in enumerate(out):
            total += 1
            if token == int(hf_top[step]):
                matched += 1
            else:
                gap = abs(float(ref[step, hf_top[step]] - ref[step, token]))
                worst.append((round(gap, 4), round(float(noise[step]), 4)))
    del hf, hf32
    return matched, total, worst


def make_random_hf_model(kind: str, path: str, seed: int = 0, embed_std: float = 0.3, weight_std: float = 0.15,
                         **overrides):
    """A small random HF model saved as safetensors, with weights large enough that greedy picks
    are not near-ties (HF's default init makes logits almost flat). The default stds suit hidden 64 in
    float32; wider models in bf16 want weight_std near 0.6/sqrt(hidden), or activations grow layer by
    layer until bf16's rounding error is as large as the gaps between the top logits."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)
    common.update(overrides)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    elif kind == "llama-tied":
        cfg = transformers.LlamaConfig(**{**common, "tie_word_embeddings": True, "num_key_value_heads": 4})
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=16)  # exercises the window mask
    elif kind == "qwen3-moe":  # layer 1 dense (mlp_only_layers), the others sparse; renormalised top-k
        moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                   mlp_only_layers=[1])
        cfg = transformers.Qwen3MoeConfig(**{**moe, **common}, head_dim=32)
    elif kind == "qwen2-moe":  # gated shared expert, top-k weights not renormalised
        moe = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                   norm_topk_prob=False)
        cfg = transformers.Qwen2MoeConfig(**{**moe, **common})
    elif kind == "mixtral":
        moe = dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=48)
        cfg = transformers.MixtralConfig(**{**common, **moe})
    else:
        raise ValueError(kind)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "mistral": transformers.MistralForCausalLM, "qwen3-moe": transformers.Qwen3MoeForCausalLM,
           "qwen2-moe": transformers.Qwen2MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM,
           }.get(kind, transformers.LlamaForCausalLM)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, embed_std if "embed" in name else weight_std)
    model.save_pretrained(path, safe_serialization=True)
    return model


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


def count_placeholders(llm) -> list[int]:
    """Wraps the runner's launch to count the placeholder tokens (async scheduling) of every step
    launched; the one-element list holds the running total."""
    used = [0]
    launch = llm.engine.runner.launch

    def counted(sched, **kw):
        used[0] += sum(sched.uses_pending_token)
        return launch(sched, **kw)

    llm.engine.runner.launch = counted
    return used


def assert_no_leaks(llm) -> None:
    m = llm.get_metrics()
    assert m["kv_blocks_free"] == m["kv_blocks_total"], m
    assert m["num_running"] == 0 and m["num_waiting"] == 0, m


def read_metrics(base: str, headers=None, timeout: float = 10, labelled: bool = False) -> dict[str, float]:
    """The server's `raylight:` series from /metrics, name -> value; `labelled`: also the series with
    labels (keyed by name and labels as printed), else only the plain ones."""
    import httpx

    out = {}
    for line in httpx.get(f"{base}/metrics", headers=headers, timeout=timeout).text.splitlines():
        if line.startswith("raylight:") and (labelled or "{" not in line):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def leave_stream(base: str, body: dict, headers=None, lines: int = 3, path: str = "/v1/completions") -> None:
    """Streams `body`, reads `lines` SSE data lines, then goes away mid-stream (a disconnecting client)."""
    import httpx

    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{base}{path}", headers=headers, json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= lines:
                    break


def wait_engines_idle(base: str, headers=None, timeout_s: float = 10.0,
                      until=None, timeout: float = 10.0) -> tuple[bool, dict[str, float]]:
    """Polls /metrics until no request runs or waits and every KV block is free (and `until(metrics)`, when
    given, holds too): (whether it got there within `timeout_s`, the last read). `timeout`: each read's."""
    import time

    deadline = time.time() + timeout_s
    while True:
        m = read_metrics(base, headers=headers, timeout=timeout)
        if (m["raylight:num_requests_running"] == 0 and m["raylight:num_requests_waiting"] == 0
                and m["raylight:kv_cache_usage_perc"] == 0 and (until is None or until(m))):
            return True, m
        if time.time() >= deadline:
            return False, m
        time.sleep(0.2)


def serve_replica_pids(app: str, deployment: str) -> list[int]:
    """Processes of a Serve app's replicas of one deployment (Ray titles a replica
    'ray::ServeReplica:<app>:<deployment>')."""
    import os

    tag = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if tag in f.read():
                    pids.append(int(d))
        except OSError:
            continue
    return pids


def load_script(name: str):
    """scripts/<name>.py of this checkout as a module (scripts are not a package), for its tests."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there while it executes
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def serve_app(cfg, name: str, timeout_s: float = 180):
    """A raylight app (an AppConfig) on this process's local Ray + Serve (`local_serve`); yields its base
    URL and deletes the app afterwards."""
    from ray import serve

    from raylight.cluster.app import build_app

    port = local_serve()
    try:
        serve.run(build_app(cfg), name=name, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        if not wait_healthy(base, timeout_s):
            raise TimeoutError(f"the {name} server did not become healthy in {timeout_s:.0f}s")
        yield base
    finally:
        delete_apps(name)


# The local Ray this process started for `local_serve`: its GCS address and Serve's HTTP port.
_LOCAL_SERVE: dict[str, object] = {}


def local_serve() -> int:
    """The HTTP port of Serve on a local Ray of 2 CPUs that this process started, starting both when
    there is none. The tests' apps run on it one after another and each deletes its own: a fresh Ray and
    Serve, with their shutdown, cost ~9 s a module on CI's 2 cores. A test that needs a Ray of its own (a
    `Cluster`) calls `ray.shutdown()` first, and the next call here starts another; tests/conftest.py shuts
    it down at the end of the session. Subprocesses never join it: a bare `ray.init()` finds only clusters
    that `ray start` or `Cluster` recorded in /tmp/ray."""
    import ray
    from ray import serve

    if ray.is_initialized() and _LOCAL_SERVE.get("gcs") == ray.get_runtime_context().gcs_address:
        try:
            serve.status()  # raises when Serve's controller is gone
            return int(_LOCAL_SERVE["port"])
        except Exception:
            pass
    shutdown_local_serve()
    if ray.is_initialized():  # a session an earlier test left behind: ours must own its resources
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    port = _start_serve(serve)
    _LOCAL_SERVE.update(gcs=ray.get_runtime_context().gcs_address, port=port)
    return port


def delete_apps(*names: str) -> None:
    """Deletes Serve apps from the local Serve, waiting until their replicas are gone (so the next app
    gets their CPUs); when that fails, shuts Ray and Serve down so the next `local_serve` starts clean."""
    from ray import serve

    try:
        for name in names:
            serve.delete(name)
        if not any(n in serve.status().applications for n in names):
            return
    except Exception:
        pass
    shutdown_local_serve()


def shutdown_local_serve() -> None:
    """Shuts down the Serve and Ray that `local_serve` started, if they are up."""
    if not _LOCAL_SERVE:
        return
    import ray
    from ray import serve

    if ray.is_initialized() and _LOCAL_SERVE.get("gcs") == ray.get_runtime_context().gcs_address:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    _LOCAL_SERVE.clear()


def _start_serve(serve, attempts: int = 3) -> int:
    """serve.start on a free port; on a bind failure (another process took the port between our check
    and the proxy's bind) Serve is shut down and started again on another. Returns the port."""
    for attempt in range(attempts):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception as e:
            if "bind" not in str(e).lower() or attempt == attempts - 1:
                raise
            serve.shutdown()
    raise AssertionError("unreachable")


def wait_healthy(base: str, timeout_s: float, still_running=lambda: True) -> bool:
    """Polls GET {base}/health until it answers 200; False on timeout or when still_running() fails."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline and still_running():
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def raylet_of(pid: int) -> int:
    """The pid of the raylet (the simulated node) that started worker process `pid`."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env[b"RAY_RAYLET_PID"])


def raylet_pid(node) -> int:
    """The raylet pid of a `ray.cluster_utils.Cluster` node."""
    import ray

    return node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
