"""Typed engine configuration, validated at the edge.

`EngineArgs` is what a user passes (`LLM(**engine_args)`, CLI flags, the Serve
config's `engine_args:`); pydantic rejects unknown keys and out-of-range values
with a message that names the field.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EPLBConfig(BaseModel):
    """Expert-parallel load balancing, with vLLM's field names and defaults."""

    model_config = ConfigDict(extra="forbid")

    window_size: int = Field(1000, ge=1, description="Steps of expert load the rebalancer looks at.")
    step_interval: int = Field(3000, ge=1, description="Steps between rebalances (the first comes after a quarter "
                               "of it); only the last window_size steps' load counts.")
    num_redundant_experts: int = Field(0, ge=0, description="Extra expert slots (replicas of the busiest experts); "
                                       "experts + redundant must divide by the EP size.")
    log_balancedness: bool = Field(False, description="Compute balancedness every log_balancedness_interval steps "
                                   "(an all-reduce each time) and log it; otherwise only at each rebalance.")
    log_balancedness_interval: int = Field(1, ge=1)


class EngineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- model ---
    model: Optional[str] = Field(
        None,
        description="Local HF directory, a .gguf file, a hub id, a preset name "
        "(with load_format='dummy'), or None for the default SmolLM2-135M-Instruct.",
    )
    tokenizer: Optional[str] = Field(None, description="Tokenizer directory; defaults to the model's.")
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0, description="Seed for dummy weights and unseeded sampling.")
    max_model_len: Optional[int] = Field(None, ge=1, description="Context window; defaults to the model's.")
    revision: Optional[str] = None
    attention_backend: Literal["auto", "torch", "triton", "flashinfer", "flashinfer+triton"] = Field(
        "auto", description="auto: on CUDA our Triton kernels for every step, with FlashInfer (when installed, "
        "half precision) for steps whose prefill rows attend over 4,096+ tokens, where it is faster; FlashInfer "
        "alone without triton; else the torch reference. flashinfer+triton: FlashInfer for every eager step "
        "(prefill, mixed), our Triton decode inside CUDA graphs.")

    # --- KV cache ---
    block_size: int = Field(16, ge=1, le=1024)
    kv_cache_memory: Optional[int] = Field(
        None, ge=1, description="Bytes for the KV cache on CPU (default 2 GiB)."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    num_kv_blocks: Optional[int] = Field(None, ge=1, description="Override the computed block count.")
    enable_prefix_caching: bool = True
    kv_role: Literal["none", "prefill", "decode", "both"] = Field(
        "none", description="Disaggregated serving: 'decode' hosts a KV endpoint that prefill replicas push "
        "prompt KV into; 'prefill' pushes the KV of requests that name a decode destination; 'both' does both.")
    kv_host: Optional[str] = Field(
        None, description="Address a decode replica advertises for its KV endpoint; None: the Ray node's "
        "address under Ray, else 127.0.0.1. The endpoint has no authentication: keep it on a private network.")
    kv_lease_s: float = Field(30.0, gt=0, description=(
        "Decode side: a reservation whose KV has not landed this long after it was made falls back to local "
        "prefill; its blocks stay quarantined until then plus this again, so a late write never lands in a reused block."))
    kv_transport: Literal["auto", "pairs"] = Field(
        "auto", description="Prefill side: how pushed KV travels. 'auto': CUDA IPC (a device-to-device copy into "
        "the decode rank's mapped cache) where the two ranks share a node and the device can reach the other's "
        "memory, else pair process groups; 'pairs': always pair process groups (NCCL send/recv on CUDA, gloo on CPU).")
    kv_max_peers: int = Field(64, ge=1, description=(
        "Prefill side: most decode ranks a rank keeps a connection (a pair process group) to; the least "
        "recently used is closed beyond that. Bounds memory: an NCCL pair communicator costs 50-100 MB of GPU memory."))
    enable_kv_events: bool = Field(
        False, description="Log what enters and leaves the prefix cache (LLMEngine.take_kv_events: BlockStored / "
        "BlockRemoved with chained block hashes), for a router that tracks which replica holds which prefix.")

    # --- scheduler ---
    max_num_batched_tokens: Optional[int] = Field(
        None, ge=1, description="Token budget of one engine step (default: 16384 on a GPU of 70 GiB or more, "
        "8192 on a smaller one, where larger prefill chunks keep the matrix units busy; 2048 on CPU). A "
        "latency-bound server may want less: a decode that shares a step with a long prefill chunk waits for "
        "all of it (configs/gpu.yaml sets 8192).")
    max_num_seqs: Optional[int] = Field(
        None, ge=1, description="Most sequences in one engine step (default: 1024 on a GPU of 70 GiB or more, "
        "256 on a smaller one and on CPU). On a GPU more sequences at once share each read of the weights; with "
        "long, mixed lengths that is most of the step (ShareGPT-like mix on an H100: 29.3k out tok/s at 1024 "
        "against 23.9k at 256).")
    max_n: int = Field(64, ge=1, description="Largest n (parallel samples) one request may ask for.")

    # --- structured outputs (xgrammar) ---
    grammar_compile_timeout_s: float = Field(
        10.0, gt=0, description="Longest a request waits for its JSON schema, regex, choice or grammar to compile "
        "(queueing included); past it the request gets a 400 and the compile's result is dropped.")
    grammar_cache_bytes: int = Field(
        256 * 1024**2, ge=0, description="Memory for compiled grammars kept for reuse (least recently used out "
        "first), so a stream of unique schemas cannot grow the process.")

    # --- GPU execution ---
    enforce_eager: bool = Field(False, description="Never use CUDA graphs (decode steps launch kernels eagerly).")
    num_microbatches: Optional[int] = Field(
        None, ge=1, description="Steps in flight at once, over disjoint sets of requests (default: "
        "pipeline_parallel_size, so every stage has work). 2 on one GPU overlaps the host's scheduling "
        "and output work with the device's compute of the other micro-batch.")
    overlap_host_work: Optional[bool] = Field(
        None, description="Turn the previous step's tokens into outputs while the device runs the next step "
        "(default: on for CUDA).")
    async_scheduling: Optional[bool] = Field(
        None, description="Schedule and launch each step while the one before it still runs on the device, its "
        "sampled tokens filled in on the device, so the device never waits for the host between steps (default: "
        "on for CUDA without pipeline parallelism and with one micro-batch; under TP rank 0 broadcasts the sampled "
        "ids to its peers). A request that stops on a sampled token wastes one token of compute.")
    warmup: Optional[bool] = Field(
        None, description="Before the engine says it is ready, run a few synthetic requests through the real step "
        "path (a prefill of the whole token budget, a mixed step, decodes; greedy and sampled rows), so every kernel "
        "the configured shapes use is compiled or loaded from its cache and the allocator holds its working set: a "
        "user's first request never waits for a compiler. Leaves no trace (blocks, prefix cache, KV events, "
        "metrics). Default: on for CUDA.")
    pipeline_cuda_graphs: bool = Field(
        False, description="Under pipeline parallelism, replay decode steps from CUDA graphs on every stage (each "
        "stage's layers captured per padded batch size; the hand-offs between stages stay outside the graphs). "
        "Off until measured on GPUs; without it, pipelined steps launch eagerly.")
    max_cuda_graph_batch_size: Optional[int] = Field(
        None, ge=1, description="Largest decode batch replayed from a CUDA graph (default: min(max_num_seqs, 512)); "
        "larger decode batches run eagerly.")
    max_piecewise_graph_tokens: Optional[int] = Field(
        None, ge=0, description="Largest step of any other kind (prefill chunks, prefill beside decodes) replayed "
        "from piecewise CUDA graphs: everything but attention captured per padded token count, attention run "
        "eagerly between the pieces (default: min(4096, max_num_batched_tokens); 0: none). Dense models on CUDA "
        "without pipeline parallelism; off with enforce_eager.")

    # --- kernel switches (raylight.kernels.config.KernelConfig; env RAYLIGHT_FUSED_KERNELS, RAYLIGHT_GEMV,
    # RAYLIGHT_CUSTOM_ALLREDUCE, RAYLIGHT_FI_DECODE_TENSOR_CORES, RAYLIGHT_PDL, RAYLIGHT_ROPE_KV set to 0/1
    # override them) ---
    fused_kernels: bool = Field(
        True, description="Fused Triton elementwise kernels (add+RMSNorm, SiLU-and-mul, rotary) where they apply "
        "(CUDA with triton installed); False runs the torch ops. Env RAYLIGHT_FUSED_KERNELS=0/1 overrides.")
    gemv: bool = Field(
        True, description="Our single-row GEMV kernel for batch-1 projections where it applies (one bf16/fp16 row "
        "on a Hopper GPU); False leaves every matmul to cuBLAS. Env RAYLIGHT_GEMV=0/1 overrides.")
    custom_allreduce: bool = Field(
        True, description="The one-shot CUDA-IPC all-reduce for small tensors under tensor parallelism where it "
        "applies (one node, peer access); False sends every all-reduce to NCCL. Env RAYLIGHT_CUSTOM_ALLREDUCE=0/1 "
        "overrides.")
    flashinfer_decode_tensor_cores: Optional[bool] = Field(
        None, description="FlashInfer decode through its tensor-core kernels (default: when more than 4 query "
        "heads share a KV head). Env RAYLIGHT_FI_DECODE_TENSOR_CORES=0/1 overrides.")
    gemv_max_rows: Optional[int] = Field(
        None, ge=1, le=64, description="Most rows a projection may have to go through our Triton GEMV kernels "
        "instead of cuBLAS (decode at small batch; shapes where cuBLAS measured faster keep cuBLAS). Default: "
        "KernelConfig's. Env RAYLIGHT_GEMV_MAX_ROWS=<n> overrides.")
    pdl: Optional[bool] = Field(
        None, description="Programmatic dependent launch for our Triton kernels on Hopper and later: each kernel "
        "launched while the previous one drains (same results). Default: KernelConfig's. Env RAYLIGHT_PDL=0/1 "
        "overrides.")
    rope_kv: Optional[bool] = Field(
        None, description="The rotary embedding and the KV-cache write in one kernel where the attention backend "
        "offers it (our Triton backend; same results, one launch fewer per layer). Default: KernelConfig's. Env "
        "RAYLIGHT_ROPE_KV=0/1 overrides.")

    # --- parallelism (one replica over tensor_parallel_size x pipeline_parallel_size processes) ---
    tensor_parallel_size: int = Field(1, ge=1, description="Ranks each layer's weights are split over (one GPU each).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages the layers are split into.")
    pipeline_layer_split: Optional[list[int]] = Field(
        None, description="Layers of each pipeline stage, first stage first (default: as even as possible, the "
        "extra layers on the first stages); must sum to the model's layer count.")
    enable_expert_parallel: bool = Field(
        False, description="Mixture-of-experts models: shard the experts over the tensor-parallel ranks (expert "
        "parallelism, EP size = tensor_parallel_size) and move tokens to them (all-to-all dispatch/combine) instead "
        "of splitting every expert's matrices over the ranks. Attention stays tensor parallel.")
    enable_eplb: bool = Field(
        False, description="Expert-parallel load balancing: record each expert's load while serving and, every "
        "eplb_config.step_interval steps, re-place (and replicate) experts over the ranks, moving weights layer "
        "by layer between steps. Needs enable_expert_parallel.")
    eplb_config: "EPLBConfig" = Field(default_factory=lambda: EPLBConfig(), description="EPLB settings (vLLM's names).")
    distributed_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a rank waits on another (a collective, a stage hand-off, startup) before "
        "the replica fails instead of hanging.")

    @field_validator("model")
    @classmethod
    def _non_empty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("model must be a non-empty path or name, or None for the default model")
        return v

    @field_validator("pipeline_layer_split")
    @classmethod
    def _split_positive(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or any(n < 1 for n in v)):
            raise ValueError(f"pipeline_layer_split must list at least one layer per stage, got {v}")
        return v

    @model_validator(mode="after")
    def _split_matches_stages(self) -> "EngineArgs":
        split = self.pipeline_layer_split
        if split is not None and len(split) != self.pipeline_parallel_size:
            raise ValueError(f"pipeline_layer_split has {len(split)} entries but pipeline_parallel_size="
                             f"{self.pipeline_parallel_size}")
        if self.enable_eplb and not self.enable_expert_parallel:
            raise ValueError("enable_eplb needs enable_expert_parallel=True (EPLB places experts over EP ranks)")
        if self.eplb_config.num_redundant_experts and not self.enable_eplb:
            raise ValueError("eplb_config.num_redundant_experts needs enable_eplb=True: without rebalancing, "
                             "redundant experts would only copy the initial placement")
        return self


EngineArgs.model_rebuild()
