"""One rank of a replica: its part of the model and of the KV cache, and, on every rank but 0,
the loop that runs the steps rank 0 broadcasts.

Every rank builds itself with `build_rank` (rank 0 inside `LLMEngine`, the others in
`run_rank`), so the ranks agree by construction: same attention backend choice, same KV block
count (each rank sizes its own pool, then all take the minimum), same CUDA-graph sizes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from raylight.config import EngineArgs
from raylight.defaults import (ALLOCATOR_SLACK_FRACTION, DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_PIECEWISE_GRAPH_TOKENS,
                               GPU_UNTRACKED_RESERVE_BYTES)
from raylight.kernels import gemv
from raylight.kernels.config import KernelConfig
from raylight.kernels.attention import AttentionSpec, CommonAttentionMetadata, get_attention_backend
from raylight.models import registry
from raylight.models.loader import ResolvedModel, build_model, resolve_model
from raylight.parallel.pipeline import StageModel
from raylight.parallel.state import ParallelConfig, ParallelGroups, leave_distributed
from raylight.messages import RankReport, StepInputs
from raylight.utils import lazy_zeros
from raylight.workers.logits_plan import run_logits_plan
from raylight.workers.model_runner import ModelRunner
from raylight.workers.rendezvous import join_world
from raylight.workers.sampler import Sampler, worst_case_metadata
from raylight.workers.step_channel import DEFAULT_CAPACITY, StepChannel

logger = logging.getLogger("raylight.worker")


def parallel_config(args: EngineArgs) -> ParallelConfig:
    split = tuple(args.pipeline_layer_split) if args.pipeline_layer_split is not None else None
    return ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size, split,
                          enable_expert_parallel=args.enable_expert_parallel,
                          num_redundant_experts=args.eplb_config.num_redundant_experts if args.enable_eplb else 0)


@dataclass
class RankModel:
    """What one rank runs steps with."""

    groups: ParallelGroups
    model: torch.nn.Module  # this rank's part of the model
    stage_model: object  # what the runner calls: the model, or under PP a StageModel doing the hand-offs
    attn_backend: object
    kv_caches: list[torch.Tensor]  # one per local layer
    num_blocks: int  # agreed by every rank
    block_size: int
    bytes_per_block: int  # of this rank's KV cache
    device: torch.device
    graphs: Optional[object] = None  # CudaGraphRunner: decode-only steps
    graph_capture_s: float = 0.0  # both kinds of graphs
    kv_endpoint: Optional[object] = None  # KVEndpoint (kv_role decode/both): prefill ranks push KV here
    kv_sender: Optional[object] = None  # KVSender (kv_role prefill/both): pushes KV to decode replicas
    eplb: Optional[object] = None  # EplbState (enable_eplb on a MoE model): steps after every forward
    piecewise: Optional[object] = None  # PiecewiseGraphRunner: the other steps, up to its token count

    def release_graphs(self) -> None:
        """Frees every CUDA graph (before leaving the torch.distributed world: see CudaGraphRunner.release)."""
        for runner in (self.graphs, self.piecewise):
            if runner is not None:
                runner.release()

    def metrics(self) -> dict:
        """This rank's figures for the engine's metrics: EPLB's, whose balancedness comes from the load
        all-reduced over the EP group (under PP: rank 0's stage)."""
        e = self.eplb
        if e is None:
            return {}
        b = e.last_balancedness
        return {"expert_balancedness_vllm": b.get("vllm", 1.0), "expert_balancedness_sglang": b.get("sglang", 1.0),
                "eplb_rebalances": e.num_rebalances, "eplb_bytes_moved": e.bytes_moved,
                "eplb_last_rebalance_s": e.last_rebalance_s}


def build_rank(args: EngineArgs, resolved: ResolvedModel, groups: ParallelGroups, device: torch.device,
               dtype: torch.dtype, max_model_len: int) -> RankModel:
    """This rank's model, KV cache and CUDA graphs. Collective under TP/PP: every rank calls it at once."""
    arch, bs = resolved.arch, args.block_size
    kernels = KernelConfig.from_args(args)  # the engine's kernel switches (env overrides read here, once)
    heads, kv_heads = registry.local_head_counts(arch, groups.tp_size, groups.tp_rank)
    backend = get_attention_backend(args.attention_backend, AttentionSpec(
        bs, heads, kv_heads, arch.head_dim, dtype, device, arch.sliding_window), kernels)
    model = build_model(resolved, backend, dtype, device, max_model_len, args.seed, groups=groups, kernels=kernels)
    has_experts = getattr(model, "ep", None) is not None and model.ep.num_moe_layers > 0
    if args.enable_eplb and has_experts:
        # Before profiling and capture, so the graphs route through the placement and record load.
        model.enable_eplb(args.eplb_config.window_size, device)
    elif (args.enable_expert_parallel or args.enable_eplb) and groups.rank == 0:
        logger.warning("enable_expert_parallel / enable_eplb have no effect: %s has no mixture-of-experts layers%s",
                       arch.architecture, " on this pipeline stage" if getattr(model, "ep", None) else "")
    elem = torch.empty((), dtype=dtype).element_size()
    bytes_per_block = model.num_local_layers * 2 * bs * kv_heads * arch.head_dim * elem

    # Under PP the decode graphs hold each stage's layers, the hand-offs stay outside them (opt-in until
    # measured on GPUs: `pipeline_cuda_graphs`); the piecewise graphs are for one stage only.
    use_graphs = (device.type == "cuda" and not args.enforce_eager
                  and (groups.pp_size == 1 or args.pipeline_cuda_graphs)
                  and getattr(backend, "supports_cuda_graphs", False))
    piecewise_tokens = piecewise_graph_tokens(args, model) if use_graphs and groups.pp_size == 1 else 0
    max_graph_bs = (args.max_cuda_graph_batch_size or min(args.max_num_seqs, 512)) if use_graphs else 0
    piecewise, capture_s = None, 0.0
    if piecewise_tokens:
        from raylight.workers.piecewise_graphs import PiecewiseGraphRunner

        # Before the KV cache (the graphs do not read it), so that the budget below sees the memory
        # their pool really took.
        piecewise = PiecewiseGraphRunner(model, backend, model.num_local_layers, piecewise_tokens, heads,
                                         arch.head_dim, dtype, device)
        capture_s += piecewise.capture()
    if args.num_kv_blocks is not None:
        budget, blocks = None, args.num_kv_blocks
    else:
        budget = (profile_gpu_kv_budget(args, model, backend, groups, device, dtype, max_model_len, max_graph_bs)
                  if device.type == "cuda" else args.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES)
        blocks = budget // bytes_per_block
    num_blocks = _min_over_ranks(int(blocks), groups)  # the scheduler's one pool must fit every rank's
    if num_blocks < 1:  # every rank raises together: nobody is left waiting in a collective
        raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {bytes_per_block} bytes"
                         f"{' on some rank' if groups.world_size > 1 else ''}; raise kv_cache_memory / "
                         f"gpu_memory_utilization")

    # Under CUDA graphs one extra block, never handed out by the pool, absorbs the padding rows' writes.
    shape = model.kv_cache_shape(num_blocks + use_graphs, bs)
    kv_caches = [lazy_zeros.zeros(shape, dtype, device) for _ in range(model.num_local_layers)]
    if piecewise is not None:
        piecewise.bind_kv_caches(kv_caches)
    if device.type == "cuda" and hasattr(backend, "warmup"):
        backend.warmup(kv_caches[0])  # compile kernels now, not during a live step
    if device.type == "cuda" and groups.is_last_stage:
        # The LM head runs eagerly, at each step's sampled rows: its GEMV variants likewise (on an
        # H100 batch 32's first decode step compiled one). Every TP rank of the stage calls it (a gather).
        counts = gemv.warmup_row_counts(kernels.gemv_max_rows if kernels.gemv else 1)
        hidden = torch.zeros(max(counts), arch.hidden_size, dtype=dtype, device=device)
        for n in counts:
            model.compute_logits(hidden[:n])
    if device.type == "cuda" and getattr(model, "moe_blocks", None):  # the MoE kernels likewise (all layers share them)
        model.moe_blocks[0].experts.warmup(args.max_num_batched_tokens or 8192)
    stage = model if groups.pp_size == 1 else StageModel(model, groups)
    graphs = None
    if use_graphs:
        from raylight.workers.cuda_graphs import CudaGraphRunner

        # Every TP rank captures the same sizes in the same order (their all-reduces are inside),
        # and replays the same one each step: the choice depends only on the broadcast inputs.
        ep = getattr(model, "ep", None)
        if ep is not None and ep.ep_size > 1:  # every captured size must take the EP dispatch with no host sync
            ep.ll_max_tokens = max(ep.ll_max_tokens, -(-max_graph_bs // ep.ep_size))
        max_blocks = min(-(-max_model_len // bs), num_blocks)
        graphs = CudaGraphRunner(model, backend, kv_caches, max_graph_bs, max_blocks, scratch_block=num_blocks,
                                 block_size=bs, device=device, stage=None if groups.pp_size == 1 else stage)
        capture_s += graphs.capture()
    endpoint, sender = _kv_transfer(args, arch, groups, model, kv_caches, device, dtype)
    return RankModel(groups, model, stage, backend, kv_caches, num_blocks, bs, bytes_per_block, device, graphs,
                     capture_s, endpoint, sender, _eplb_state(args, model, groups), piecewise)


def piecewise_graph_tokens(args: EngineArgs, model) -> int:
    """Largest step (in tokens) that the piecewise CUDA graphs take; 0: none. Dense models only: a
    mixture-of-experts layer's routing sizes its work from the step's data."""
    if getattr(model, "moe_blocks", None):
        return 0
    limit = args.max_piecewise_graph_tokens
    if limit is None:
        limit = DEFAULT_PIECEWISE_GRAPH_TOKENS
    return min(limit, args.max_num_batched_tokens)


def _eplb_state(args: EngineArgs, model, groups: ParallelGroups):
    """The load balancer of this rank's MoE layers, or None. Its recorder starts empty: profiling and
    graph capture ran forwards that were not traffic."""
    ep = getattr(model, "ep", None)
    if ep is None or ep.recorder is None:
        return None
    from raylight.parallel.eplb import EplbState

    ep.recorder.reset()
    c = args.eplb_config
    return EplbState(ep.placement, ep.recorder, model.expert_weights(), groups.ep_rank, groups.ep_size,
                     groups.ep_group, c.step_interval, log_balancedness=c.log_balancedness,
                     log_balancedness_interval=c.log_balancedness_interval,
                     first_rebalance_after=max(1, c.step_interval // 4))  # as vLLM: the first one comes early


def kv_layout(args: EngineArgs, arch, groups: ParallelGroups, dtype: torch.dtype):
    """This replica's KV cache layout as a disaggregation peer sees it."""
    from raylight.kvtransfer.layout import KVLayout

    return KVLayout(arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim,
                    args.block_size, str(dtype).replace("torch.", ""), groups.tp_size,
                    tuple(groups.config.layer_ranges(arch.num_hidden_layers)))


def _kv_transfer(args: EngineArgs, arch, groups: ParallelGroups, model, kv_caches, device, dtype):
    """The KV endpoint (decode role) and sender (prefill role) of this rank; collective when the
    replica has several ranks (rank 0 tells the others where its endpoint's store is)."""
    if args.kv_role == "none":
        return None, None
    from raylight.kvtransfer.endpoint import KVEndpoint
    from raylight.kvtransfer.sender import KVSender

    layout = kv_layout(args, arch, groups, dtype)
    endpoint = sender = None
    if args.kv_role in ("decode", "both"):
        endpoint = KVEndpoint.start(layout, groups.rank, kv_caches, device, groups.cpu_group, args.kv_host)
    if args.kv_role in ("prefill", "both"):
        sender = KVSender(layout, groups.rank, kv_caches, device, args.kv_max_peers, args.kv_transport)
        sender.install(model)
    return endpoint, sender


def _min_over_ranks(value: int, groups: ParallelGroups) -> int:
    if groups.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=groups.cpu_group)
    return int(t.item())


def profile_batch(num_tokens: int, max_model_len: int, block_size: int, device: torch.device):
    """The profile's step: `num_tokens` prompt tokens (the scheduler's token budget) as prompts of at
    most `max_model_len` tokens each, as a full step may hold when max_model_len is below the budget.
    Returns (metadata, positions, blocks the sequences use)."""
    lens = np.full(num_tokens // max_model_len, max_model_len, dtype=np.int64)
    if num_tokens % max_model_len:
        lens = np.append(lens, num_tokens % max_model_len)
    per_seq = -(-max_model_len // block_size) if len(lens) > 1 else -(-num_tokens // block_size)
    tables = np.arange(len(lens) * per_seq, dtype=np.int64).reshape(len(lens), per_seq)
    starts = np.concatenate([[0], np.cumsum(lens)])
    positions = np.concatenate([np.arange(n) for n in lens])
    seq_of_token = np.repeat(np.arange(len(lens)), lens)
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    common = CommonAttentionMetadata(num_decodes=0, query_start_loc=starts, seq_lens=lens, block_tables=tables,
                                     slot_mapping=torch.from_numpy(slots).to(device))
    return common, torch.from_numpy(positions).to(device), int(tables.size)


@torch.inference_mode()
def profile_gpu_kv_budget(args: EngineArgs, model: torch.nn.Module, backend, groups: ParallelGroups,
                          device: torch.device, dtype: torch.dtype, max_model_len: int,
                          decode_graph_tokens: int = 0) -> int:
    """Runs one forward of this rank's layers at the full token budget (as prompts of at most
    max_model_len tokens) and samples the largest decode batch every memory-hungry way; what remains
    under the utilization cap is KV, less room for the activations of the decode CUDA graphs (batches
    up to `decode_graph_tokens`, captured after the KV cache, so estimated here in proportion). Memory
    taken before the call (weights, the piecewise graphs' pool) is measured, not estimated.
    A later PP stage runs on zero activations instead of receiving any, so stages profile at the same
    time without talking; TP ranks of a stage run their all-reduces."""
    n = args.max_num_batched_tokens
    common, positions, nb = profile_batch(n, max_model_len, args.block_size, device)
    scratch = [torch.zeros(model.kv_cache_shape(nb, args.block_size), dtype=dtype, device=device)
               for _ in range(model.num_local_layers)]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(n, dtype=torch.long, device=device)
    intermediate = None
    if not groups.is_first_stage:
        h = torch.zeros(n, model.config.hidden_size, dtype=dtype, device=device)
        intermediate = (h, torch.zeros_like(h))
    out = model(ids, positions, scratch, backend.build(common), intermediate)
    if groups.is_last_stage:
        # the logits of a full decode step and their sampling's worst case (sampler.worst_case_metadata)
        logits = model.compute_logits(out[-min(n, args.max_num_seqs):])
        if logits is not None:  # TP rank 0 samples
            Sampler(device)(logits.float(), worst_case_metadata(logits.shape[0], logits.shape[1], device))
        del logits
    torch.cuda.synchronize(device)
    peak_extra = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    del scratch, out, intermediate
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # The decode graphs keep their own activations (their memory pool) beside the eager steps'.
    peak_extra += peak_extra * min(decode_graph_tokens, n) // n
    # what start-up creates after this outside the allocator is not in (total - free) yet; the allocator's
    # cache reserves more than the allocated peak once steps of other sizes ran (defaults.py)
    slack = int(peak_extra * ALLOCATOR_SLACK_FRACTION)
    budget = (int(total * args.gpu_memory_utilization) - (total - free) - peak_extra - slack
              - GPU_UNTRACKED_RESERVE_BYTES)
    logger.info("rank %d GPU memory: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB (+%.2f GiB for the "
                "allocator's cache) -> KV budget %.1f GiB", groups.rank, total / 2**30, (total - free) / 2**30,
                peak_extra / 2**30, slack / 2**30, budget / 2**30)
    return max(budget, 0)


# ---------------------------------------------------------------- ranks other than 0

@torch.inference_mode()
def run_step(runner: ModelRunner, groups: ParallelGroups, inputs: StepInputs) -> None:
    """A step on a rank other than 0: rank 0's forward, then, on the last stage, the step's logits
    plan (each call gathers the vocabulary slices of every TP rank, so all make the same ones)."""
    hidden = runner.forward(inputs)
    if hidden is None or groups.tp_size == 1:
        return  # an earlier stage: its hand-off to the next one is already on its way
    run_logits_plan(runner.model, hidden, inputs)


def serve_steps(rank: RankModel, channel: StepChannel) -> int:
    """Runs broadcast steps until rank 0 says stop; returns how many ran. Answers rank 0's report
    requests in between (`rank_report`)."""
    share = rank.groups.broadcast_from_tp0 if rank.groups.tp_size > 1 else None
    runner = ModelRunner(rank.stage_model, rank.attn_backend, rank.kv_caches, rank.block_size, rank.device,
                         graphs=rank.graphs, piecewise=rank.piecewise, share_ids=share, kv_sender=rank.kv_sender,
                         after_forward=rank.eplb.step if rank.eplb is not None else None)
    steps = 0
    channel.report = lambda: rank_report(rank, steps)
    while (inputs := channel.receive()) is not None:
        run_step(runner, rank.groups, inputs)
        steps += 1
    if isinstance(rank.stage_model, StageModel):
        rank.stage_model.wait()
    if rank.device.type == "cuda":
        torch.cuda.synchronize(rank.device)
    return steps


def rank_report(rank: RankModel, num_steps: int) -> RankReport:
    """What this rank tells rank 0 when asked: what its model recorded since the last report
    (a MoE model's per-expert token counts, for EPLB) and the steps it ran."""
    take_load = getattr(rank.model, "take_expert_load", None)
    report = RankReport(rank.groups.rank, num_steps)
    if take_load is not None:
        report.expert_load = np.asarray(take_load(), dtype=np.int64)
    return report


@dataclass
class RankSpec:
    """Everything a rank other than 0 needs to join its replica (pickled to a process or an actor)."""

    args: EngineArgs
    resolved: ResolvedModel
    dtype: torch.dtype
    max_model_len: int
    world_size: int
    init_method: str  # torch.distributed rendezvous at rank 0
    device_type: str  # "cpu" or "cuda": each rank drives one device of this type
    channel_capacity: int = DEFAULT_CAPACITY


def run_rank(spec: RankSpec, rank: int, device: torch.device) -> int:
    """A rank's whole life: join the world, build its part, run steps until rank 0 stops them."""
    join_world(rank, spec.world_size, spec.init_method, device, spec.args.distributed_timeout_s)
    built = None
    try:
        groups = ParallelGroups.from_world(parallel_config(spec.args), KernelConfig.from_args(spec.args))
        resolved = spec.resolved
        if resolved.path is not None and not os.path.isdir(resolved.path):
            # Another node (a PP stage placed elsewhere): fetch or convert the model here too.
            resolved = resolve_model(spec.args.model, spec.args.load_format, spec.args.revision)
        built = build_rank(spec.args, resolved, groups, device, spec.dtype, spec.max_model_len)
        logger.info("rank %d (tp %d, pp %d) ready: layers %s, %d KV blocks", rank, groups.tp_rank, groups.pp_rank,
                    built.model.layer_range, built.num_blocks)
        return serve_steps(built, StepChannel(groups.cpu_group, rank, spec.channel_capacity))
    finally:
        for part in (built.kv_endpoint, built.kv_sender) if built is not None else ():
            if part is not None:
                part.close()
        if built is not None:
            built.release_graphs()  # before leaving the world: see CudaGraphRunner.release
        leave_distributed()


def local_rank_main(spec: RankSpec, rank: int, num_threads: int) -> None:
    """Runs a rank that `LocalRanks` started (a child process of the engine's, see rank_main.py)."""
    torch.set_num_threads(num_threads)  # rank_main already watches the engine's process (ends us with it)
    hang_s = float(os.environ.get("RAYLIGHT_DUMP_STACKS_AFTER_S", "0"))
    if hang_s > 0:  # debugging a stuck replica: every rank prints its stacks after this long
        import faulthandler

        faulthandler.dump_traceback_later(hang_s, exit=False)
    device = torch.device("cuda", rank) if spec.device_type == "cuda" else torch.device("cpu")
    try:
        run_rank(spec, rank, device)
    except BaseException:
        logger.exception("rank %d failed", rank)
        os._exit(1)  # skip atexit handlers that could wait on the broken process group
