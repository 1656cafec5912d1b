"""One engine replica: model, KV cache, scheduler and the `schedule -> execute -> update` step."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from raylight.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineArgs
from raylight.kernels.attention import get_attention_backend
from raylight.models.loader import build_model, resolve_model
from raylight.outputs import CompletionOutput, RequestOutput
from raylight.sampling_params import SamplingParams
from raylight.workers.kv_cache_manager import KVCacheManager
from raylight.workers.model_runner import ModelRunner
from raylight.workers.request import Request, RequestStatus
from raylight.workers.scheduler import Scheduler
from raylight.workers.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger("raylight.engine")

PromptType = Union[str, list[int], dict[str, Any]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Tracked:
    """Output-side state of a live request."""

    request: Request
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    def __init__(self, args: EngineArgs):
        t0 = time.monotonic()
        self.args = args
        self.device = _resolve_device(args.device)
        resolved = resolve_model(args.model, args.load_format, args.revision)
        self.model_name = resolved.name
        self.model_path = resolved.path
        arch = self.arch = resolved.arch
        self.dtype = _resolve_dtype(args.dtype, arch.torch_dtype, self.device)
        self.max_model_len = args.max_model_len or arch.max_position_embeddings
        if self.max_model_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={arch.max_position_embeddings}")
        self.tokenizer = load_tokenizer(args.tokenizer or resolved.path)
        self.eos_token_ids = frozenset(arch.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer is not None and self.tokenizer.eos_token_id is not None
            else set())

        self.block_size = args.block_size
        self.attn_backend = get_attention_backend("auto", self.device)(
            args.block_size, arch.sliding_window, self.device)
        self.model = build_model(resolved, self.attn_backend, self.dtype, self.device,
                                 self.max_model_len, args.seed)
        self.num_blocks = self._num_kv_blocks()
        shape = (self.num_blocks, 2, args.block_size, arch.num_key_value_heads, arch.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(arch.num_hidden_layers)]
        self.kv = KVCacheManager(self.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, args.max_num_batched_tokens, args.max_num_seqs, self.max_model_len)
        self.runner = ModelRunner(self.model, self.attn_backend, self.kv_caches, self.kv, self.device, args.seed)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info(
            "engine ready in %.1fs: model=%s dtype=%s device=%s attention=%s KV cache: %d blocks x %d tokens "
            "= %d tokens, %.2f GiB; max_model_len=%d",
            time.monotonic() - t0, self.model_name, str(self.dtype).replace("torch.", ""), self.device,
            self.attn_backend.name, self.num_blocks, args.block_size, self.num_blocks * args.block_size,
            self.kv_cache_bytes / 2**30, self.max_model_len)

    # ---- sizing ----
    @property
    def bytes_per_block(self) -> int:
        a = self.arch
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return a.num_hidden_layers * 2 * self.block_size * a.num_key_value_heads * a.head_dim * elem

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def _num_kv_blocks(self) -> int:
        if self.args.num_kv_blocks is not None:
            return self.args.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._profile_gpu_kv_budget()
        else:
            budget = self.args.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
        blocks = budget // self.bytes_per_block
        if blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of "
                             f"{self.bytes_per_block} bytes; raise kv_cache_memory / gpu_memory_utilization")
        return int(blocks)

    @torch.inference_mode()
    def _profile_gpu_kv_budget(self) -> int:
        """Runs one forward at the full token budget; what remains under the utilization cap is KV."""
        n = min(self.args.max_num_batched_tokens, self.max_model_len)
        nb = -(-n // self.block_size)
        a = self.arch
        scratch = [torch.zeros((nb, 2, self.block_size, a.num_key_value_heads, a.head_dim), dtype=self.dtype,
                               device=self.device) for _ in range(a.num_hidden_layers)]
        import numpy as np

        from raylight.kernels.attention import CommonAttentionMetadata

        common = CommonAttentionMetadata(
            num_decodes=0, query_start_loc=np.array([0, n]), seq_lens=np.array([n]),
            block_tables=np.arange(nb, dtype=np.int64)[None], slot_mapping=torch.arange(n, device=self.device))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), scratch, self.attn_backend.build(common))
        self.model.compute_logits(hidden[-min(n, self.args.max_num_seqs):])
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        budget = int(total * self.args.gpu_memory_utilization) - (total - free) - peak_extra
        logger.info("GPU memory: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB -> KV budget %.1f GiB",
                    total / 2**30, (total - free) / 2**30, peak_extra / 2**30, budget / 2**30)
        return max(budget, 0)

    # ---- requests ----
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def make_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                     request_id: Optional[str] = None, cache_salt: Optional[str] = None) -> Request:
        """Validates and tokenizes; raises ValueError naming the problem. Queues nothing."""
        params = params or SamplingParams()
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("prompt is empty (it has no tokens)")
        vocab = self.arch.vocab_size
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {ids[bad]} at position {bad} is outside the vocabulary [0, {vocab})")
        for t in params.stop_token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, longer than the context window "
                             f"(max_model_len={self.max_model_len})")
        needed = self.kv.blocks_needed(len(ids))
        if needed > self.num_blocks:
            raise ValueError(f"prompt needs {needed} KV blocks ({len(ids)} tokens) but the whole KV cache holds "
                             f"{self.num_blocks} blocks; raise kv_cache_memory or shorten the prompt")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, max(room, 1))
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._tracked:
            raise ValueError(f"request_id {rid!r} is already in use")
        return Request(rid, ids, params, max_tokens, self.eos_token_ids, text, cache_salt)

    def enqueue(self, req: Request) -> None:
        skip = req.sampling_params.skip_special_tokens
        self._tracked[req.request_id] = _Tracked(req, IncrementalDetokenizer(self.tokenizer, skip))
        self.scheduler.add_request(req)
        self.prompt_tokens_total += req.num_prompt_tokens

    def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, cache_salt: Optional[str] = None) -> str:
        req = self.make_request(prompt, params, request_id, cache_salt)
        self.enqueue(req)
        return req.request_id

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        aborted = self.scheduler.abort(request_ids)
        return [self._finish_output(r, [], "") for r in aborted]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.requests:
            # Nothing fits even alone: the sequence outgrew the whole pool. End it rather than spin.
            outs = []
            for req in self.scheduler.unschedulable():
                logger.warning("request %s needs more KV blocks than the cache has; ending it", req.request_id)
                self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
                outs.append(self._finish_output(req, [], ""))
            return outs
        sampled = self.runner.execute(sched)
        self.num_steps += 1
        outputs = []
        for req in self.scheduler.update(sched, sampled):
            tracked = self._tracked[req.request_id]
            token = req.output_token_ids[-1]
            delta = tracked.detokenizer.step(token)
            self.generation_tokens_total += 1
            outputs.append(self._output(req, [token], delta))
            if req.is_finished:
                self._untrack(req.request_id)
        return outputs

    def _untrack(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self.runner.release(request_id)

    def _finish_output(self, req: Request, new_ids: list[int], delta: str) -> RequestOutput:
        out = self._output(req, new_ids, delta)
        self._untrack(req.request_id)
        return out

    def _output(self, req: Request, new_ids: list[int], delta: str) -> RequestOutput:
        tracked = self._tracked.get(req.request_id)
        text = tracked.detokenizer.text if tracked else ""
        finish = req.status.value if req.is_finished else None
        completion = CompletionOutput(0, text, list(req.output_token_ids), finish, req.stop_reason)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], req.is_finished,
                             req.num_cached_tokens, new_ids, delta)

    def get_metrics(self) -> dict[str, Any]:
        s = self.scheduler.stats
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": self.kv.usage(),
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
            "prefix_cache_hit_rate": s.prefix_cache_hit_tokens / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            "preemptions": s.preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_steps": self.num_steps,
        }


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def _resolve_dtype(name: str, model_dtype: Optional[str], device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and inexact
    return _DTYPES.get(str(model_dtype), torch.bfloat16) if model_dtype != "float32" else torch.bfloat16
