"""The rank function of tests/gpu/test_custom_allreduce_gpu.py (spawned processes import it by module name)."""

from __future__ import annotations

import json
import os

import torch


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from raylight.kernels.fused import fused_add_rms_norm
    from raylight.kernels.norm import RMSNorm
    from raylight.parallel.state import ParallelConfig, ParallelGroups, init_distributed

    torch.set_grad_enabled(False)
    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cuda", rank))
    groups = ParallelGroups.from_world(ParallelConfig(tensor_parallel_size=world))
    car = groups.custom_ar
    report: dict = {"custom_ar": car is not None, "errors": []}
    if car is not None:
        g = torch.Generator(device="cuda").manual_seed(rank)
        shapes = [(1, 4096), (7, 4096), (256, 2048), (33, 1000), (3, 8192), (512, 4096)]
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for shape in shapes:
                x = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
                ref = x.clone()
                dist.all_reduce(ref, group=groups.tp_group)
                got = groups.all_reduce(x.clone())
                if not car.fits(x):
                    report.setdefault("nccl_fallback", []).append(list(shape))
                if not torch.equal(got, ref):
                    report["errors"].append(f"all_reduce {dtype} {shape}: max diff "
                                            f"{(got.float() - ref.float()).abs().max().item()}")
                # fused: norm of (sum + residual) and the new residual, vs NCCL then our fused kernel
                res = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
                dist.broadcast(res, src=0, group=groups.tp_group)  # the residual is whole: same on every rank
                w = (torch.rand(shape[-1], generator=g, device="cuda") + 0.5).to(dtype)
                dist.broadcast(w, src=0, group=groups.tp_group)
                norm = RMSNorm(shape[-1], 1e-6).to(device="cuda", dtype=dtype)
                norm.weight.data.copy_(w)
                out, res_out = groups.reduce_add_norm(x, res, norm)
                want_out, want_res = fused_add_rms_norm(ref, res, w, 1e-6)
                if not torch.equal(res_out, want_res):
                    report["errors"].append(f"fused residual {dtype} {shape}")
                if (out.float() - want_out.float()).abs().max().item() > 2e-2 * want_out.float().abs().max().item():
                    report["errors"].append(f"fused norm {dtype} {shape}: max diff "
                                            f"{(out.float() - want_out.float()).abs().max().item()}")
        # A CUDA graph of custom calls of several shapes between NCCL calls, replayed with new inputs.
        xs = [torch.zeros(s, device="cuda", dtype=torch.bfloat16) for s in [(1, 4096), (16, 4096), (5, 512)]]
        nccl_x = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            [groups.all_reduce(x) for x in xs]
            dist.all_reduce(nccl_x, group=groups.tp_group)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = []
            for x in xs:
                outs.append(groups.all_reduce(x))
                dist.all_reduce(nccl_x, group=groups.tp_group)
                outs.append(groups.all_reduce(outs[-1]))  # a dependent second call: the other parity
        for it in range(50):
            for x in xs:
                x.copy_(torch.randn(x.shape, generator=g, device="cuda", dtype=x.dtype))
            graph.replay()
            for i, x in enumerate(xs):
                ref = x.clone()
                dist.all_reduce(ref, group=groups.tp_group)
                if not torch.equal(outs[2 * i], ref):
                    report["errors"].append(f"graph replay {it} call {i}")
                ref2 = ref.clone()
                dist.all_reduce(ref2, group=groups.tp_group)
                if not torch.equal(outs[2 * i + 1], ref2):
                    report["errors"].append(f"graph replay {it} dependent call {i}")
        graph.reset()
        report["num_calls"] = car.num_calls
    torch.cuda.synchronize()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.distributed_c10d._abort_process_group()
