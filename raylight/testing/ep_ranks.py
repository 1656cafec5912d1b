"""What the expert-parallel dispatch/combine tests run inside each rank (gloo on CPU, NCCL on GPU).

Spawning ranks is slow, so one run per world size performs every check of the interface
contract (docs: moe-parallel.md section 7) over several routing scenarios and returns, per
"scenario/check", the list of failures. Failures are recorded, never raised mid-run: a rank that
stopped early would leave its peers waiting in the next collective. References are plain Python
loops over the all-gathered routing. x is provenance-checkable: x[t, h] = rank * 1000 + t + (h % 4) / 4.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

from raylight.parallel.ep_buffer import EPBuffer

TMAX = 16
H = 8
CHECKS = ("layout", "no_expert_tokens", "once_per_rank", "source_order", "recv_topk", "expert_counts",
          "combine_identity", "worst_tokens", "cached", "ll_recv", "ll_combine", "ll_no_sync", "ll_fp8", "determinism",
          "moe_normal", "moe_ll")


def scenarios(world: int) -> dict[str, dict]:
    """Token counts per rank (uneven, a zero-token rank), experts per rank, top-k."""
    return {
        "uneven": dict(tokens=[7, 0, 12, 3], experts=4 * world, k=3),         # rank 1 has no tokens
        "eloc1": dict(tokens=[5, 9, 2, 4], experts=world, k=min(2, world)),  # one expert per rank
        "sparse": dict(tokens=[0, 4, 0, 2], experts=2 * world, k=2),         # mostly empty ranks
    }


# ---------------------------------------------------------------- inputs

def make_routing(rank: int, t: int, experts: int, k: int, seed: int):
    """Distinct experts per token, some -1 entries, every fourth token with no expert at all."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)]) if t else \
        torch.zeros(0, k, dtype=torch.long)
    drop = torch.rand(t, k, generator=g) < 0.25
    drop[::4] = True
    idx = torch.where(drop, -1, idx)
    w = torch.rand(t, k, generator=g) + 0.1
    return idx, w


def make_x(rank: int, t: int, dtype=torch.float32) -> torch.Tensor:
    base = rank * 1000 + torch.arange(t, dtype=torch.float64).view(-1, 1)
    x = base + (torch.arange(H) % 4).view(1, -1) / 4
    if dtype == torch.bfloat16:  # bf16 keeps integers up to 256 exact
        x = (rank * 32 + torch.arange(t, dtype=torch.float64)).view(-1, 1).expand(t, H)
    return x.to(dtype)


@contextlib.contextmanager
def forbid_host_sync():
    """Every way our code could read a device value on the host raises inside this block (on CUDA,
    torch's sync debug mode is switched on as well)."""
    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: {name}")
        return f

    saved = {}
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy", "masked_select", "unique"):
        saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, boom(name))
    for name in ("nonzero", "masked_select", "unique", "argwhere"):
        saved[(torch, name)] = getattr(torch, name)
        setattr(torch, name, boom(name))
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, i):
        for j in (i if isinstance(i, tuple) else (i,)):
            if isinstance(j, torch.Tensor) and j.dtype == torch.bool:
                raise AssertionError("host sync: boolean-mask indexing")
        return getitem(self, i)

    saved[(torch.Tensor, "__getitem__")] = getitem
    torch.Tensor.__getitem__ = checked_getitem
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        for (owner, name), f in saved.items():
            setattr(owner, name, f)


class Checker:
    def __init__(self):
        self.failures: dict[str, list[str]] = {}

    def expect(self, name: str, ok, msg: str) -> None:
        self.failures.setdefault(name, [])
        if not bool(ok):
            self.failures[name].append(msg)


# ---------------------------------------------------------------- references from the gathered routing

def ref_layout(topk: torch.Tensor, experts: int, world: int):
    e_loc = experts // world
    per_rank, per_expert = [0] * world, [0] * experts
    in_rank = [[False] * world for _ in range(topk.shape[0])]
    for t, row in enumerate(topk.tolist()):
        for e in row:
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // e_loc] = True
        for r in range(world):
            per_rank[r] += in_rank[t][r]
    return per_rank, per_expert, in_rank


def ref_recv(all_topk, all_w, me: int, e_loc: int):
    """Rows rank `me` receives in normal mode: [(source, token, local ids, weights)] in order."""
    rows = []
    for s, (topk, w) in enumerate(zip(all_topk, all_w)):
        for t, (row, wr) in enumerate(zip(topk.tolist(), w.tolist())):
            local = [e - me * e_loc if e >= 0 and e // e_loc == me else -1 for e in row]
            if any(i >= 0 for i in local):
                rows.append((s, t, local, [wi if i >= 0 else 0.0 for i, wi in zip(local, wr)]))
    return rows


def ref_ll(all_topk, me: int, e_loc: int):
    """Per local expert: the source token of each row in masked layout order, and per source the count."""
    srcs, counts = [], []
    for le in range(e_loc):
        e = me * e_loc + le
        rows, per_src = [], []
        for topk in all_topk:
            mine = [t for t, row in enumerate(topk.tolist()) for ek in row if ek == e]
            rows += mine
            per_src.append(len(mine))
        srcs.append(rows)
        counts.append(per_src)
    return srcs, counts


def _gather(obj, world):
    if not dist.is_initialized():  # group None: the lone rank is everybody
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- the checks

def ep_contract_checks(rank: int, world: int, device: str = "cpu", seed: int = 0) -> dict[str, list[str]]:
    dev = torch.device(device)
    group = dist.group.WORLD if dist.is_initialized() else None
    results = {}
    for name, sc in scenarios(world).items():
        ck = Checker()
        _scenario(ck, rank, world, dev, group, sc, seed)
        for check, msgs in ck.failures.items():
            results[f"{name}/{check}"] = msgs
    return results


def _scenario(ck: Checker, rank, world, dev, group, sc, seed):
    experts, k = sc["experts"], sc["k"]
    t = sc["tokens"][rank % 4]
    e_loc = experts // world
    topk, w = make_routing(rank, t, experts, k, seed)
    all_topk, all_w = zip(*_gather((topk, w), world))
    topk, w = topk.to(dev), w.to(dev)
    x = make_x(rank, t).to(dev)
    buf = EPBuffer(group, experts, H, TMAX)

    # 1. Layout, exactly as DeepEP's, -1 ignored.
    per_rank, rdma, per_expert, in_rank, event = buf.get_dispatch_layout(topk, experts)
    want_rank, want_expert, want_in = ref_layout(topk.cpu(), experts, world)
    ck.expect("layout", rdma is None and per_rank.dtype == per_expert.dtype == torch.int32
              and in_rank.dtype == torch.bool, "dtypes / rdma slot")
    ck.expect("layout", per_rank.tolist() == want_rank, f"num_tokens_per_rank {per_rank.tolist()} != {want_rank}")
    ck.expect("layout", per_expert.tolist() == want_expert, "num_tokens_per_expert")
    ck.expect("layout", in_rank.cpu().tolist() == [r for r in want_in] and tuple(in_rank.shape) == (t, world),
              "is_token_in_rank")
    event.current_stream_wait()

    # 2. Normal dispatch: once per destination rank, grouped by source, local ids, counts.
    kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
              topk_idx=topk, topk_weights=w)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, **kw)
    want = ref_recv(all_topk, all_w, rank, e_loc)
    got_src = list(zip((recv_x[:, 0] // 1000).long().tolist(), (recv_x[:, 0] % 1000).long().tolist()))
    want_src = [(s, tok) for s, tok, _, _ in want]
    ck.expect("once_per_rank", len(got_src) == len(want) and len(set(got_src)) == len(got_src),
              f"{len(got_src)} rows, want {len(want)} distinct")
    ck.expect("source_order", got_src == want_src, f"rows {got_src} != {want_src}")
    ck.expect("source_order", handle.recv_src_idx.tolist() == [tok for _, tok, _, _ in want], "recv_src_idx")
    full = torch.cat([make_x(s, tok + 1)[tok:] for s, tok in want_src]) if want else torch.zeros(0, H)
    ck.expect("source_order", torch.equal(recv_x.cpu(), full), "row contents are not the source rows")
    per_src = [sum(1 for s, *_ in want if s == j) for j in range(world)]
    ck.expect("source_order", handle.recv_prefix.tolist() == torch.tensor(per_src).cumsum(0).tolist(), "recv_prefix")
    ck.expect("recv_topk", recv_idx.tolist() == [loc for _, _, loc, _ in want], "recv_topk_idx")
    ck.expect("recv_topk", torch.allclose(recv_w.cpu(), torch.tensor([wr for *_, wr in want]).view(-1, k)),
              "recv_topk_weights")
    want_counts = [sum(int((tk == rank * e_loc + le).sum()) for tk in all_topk) for le in range(e_loc)]
    ck.expect("expert_counts", counts == want_counts, f"{counts} != {want_counts}")
    counts4 = buf.dispatch(x, **kw, expert_alignment=4)[3]
    ck.expect("expert_counts", counts4 == [-(-c // 4) * 4 for c in want_counts], f"aligned {counts4}")

    # 3. combine(dispatch(x)) = x * #ranks that received the token; 0 for tokens with no expert.
    times = in_rank.sum(1, keepdim=True).float()
    bias = torch.ones(t, H, device=dev)
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, bias=bias)
    ck.expect("combine_identity", torch.equal(combined, x * times + 1), "combined != x * is_token_in_rank.sum(1)")
    ck.expect("combine_identity", torch.allclose(combined_w, torch.where(topk >= 0, w, 0.0)), "combined weights")
    nothing = (topk < 0).all(1).cpu()
    everyone = _gather(got_src, world)
    leaked = [(s, tok) for rows in everyone for s, tok in rows
              if s == rank and bool(nothing[tok])]
    ck.expect("no_expert_tokens", not leaked, f"no-expert tokens were sent: {leaked}")
    ck.expect("no_expert_tokens", combined[(topk < 0).all(1)].eq(1).all(), "combine of a no-expert token != 0 (+bias)")
    xb = make_x(rank, t, torch.bfloat16).to(dev)
    rb, _, _, _, hb, _ = buf.dispatch(xb, **kw)
    cb = buf.combine(rb, hb)[0]
    ck.expect("combine_identity", cb.dtype == torch.bfloat16 and torch.equal(cb, (xb.float() * times).bfloat16()),
              "bf16: not fp32-accumulated and cast once")

    # 4. num_worst_tokens: fixed shapes, no host read, prefix = the synced result.
    worst = world * TMAX
    with forbid_host_sync():
        wx, widx, ww, wlist, wh, _ = buf.dispatch(x, **kw, num_worst_tokens=worst)
        wc, wcw, _ = buf.combine(wx, wh, topk_weights=ww)
    n = recv_x.shape[0]
    ck.expect("worst_tokens", wx.shape == (worst, H) and widx.shape == (worst, k) and wlist == [], "shapes/list")
    ck.expect("worst_tokens", torch.equal(wx[:n], recv_x) and torch.equal(widx[:n], recv_idx)
              and torch.equal(ww[:n], recv_w), "prefix differs from the synced dispatch")
    ck.expect("worst_tokens", bool((widx[n:] == -1).all()) and bool((ww[n:] == 0).all()), "padding rows")
    ck.expect("worst_tokens", torch.equal(wc, combined - 1) and torch.allclose(wcw, combined_w), "worst combine")

    # 5. Cached dispatch: same layout, same row order; combine takes any x with N_recv rows.
    x2 = x * 2 + 1
    cx, *rest = buf.dispatch(x2, handle=handle)
    ck.expect("cached", torch.equal(cx, recv_x * 2 + 1) and all(r is None for r in rest[:4]), "cached rows")
    with forbid_host_sync():
        cwx = buf.dispatch(x2, handle=wh)[0]
    ck.expect("cached", torch.equal(cwx[:n], recv_x * 2 + 1), "cached worst-mode rows")
    ck.expect("cached", torch.equal(buf.combine(cx, handle)[0], x2 * times), "combine after cached dispatch")

    # 6. Low-latency mode.
    _low_latency(ck, buf, rank, world, dev, x, topk, w, all_topk, e_loc, k)

    # 8. Determinism: identical inputs, bit-identical outputs (fp32 and bf16, every mode).
    for dtype in (torch.float32, torch.bfloat16):
        xd = torch.randn(t, H, generator=torch.Generator().manual_seed(rank)).to(dtype).to(dev)
        runs = []
        for _ in range(2):
            rx, _, _, _, h1, _ = buf.dispatch(xd, **kw)
            rw_, _, _, _, h2, _ = buf.dispatch(xd, **kw, num_worst_tokens=worst)
            lx, _, lh, _, _ = buf.low_latency_dispatch(xd, topk, TMAX, experts, use_fp8=False)
            runs.append([rx, buf.combine(rx * 3, h1)[0], rw_, buf.combine(rw_ * 3, h2)[0], lx,
                         buf.low_latency_combine(lx * 3, topk, w, lh)[0]])
        ck.expect("determinism", all(torch.equal(a, b) for a, b in zip(*runs)), f"{dtype}: outputs differ")

    # End to end: an EP MoE layer equals the single-process MoE.
    _moe(ck, buf, rank, world, dev, topk, w, experts, e_loc, kw)


def _low_latency(ck, buf, rank, world, dev, x, topk, w, all_topk, e_loc, k):
    experts, t = buf.num_experts, x.shape[0]
    stats = torch.zeros(e_loc, dtype=torch.int32, device=dev)
    with forbid_host_sync():
        lx, count, lh, _, hook = buf.low_latency_dispatch(x, topk, TMAX, experts, stats, use_fp8=False,
                                                          return_recv_hook=True)
        hook()
        kept = lx.clone()
        buf.low_latency_dispatch(x, topk, TMAX, experts, stats, use_fp8=False)  # three results alive at once
        third = buf.low_latency_dispatch(x, topk, TMAX, experts, use_fp8=False)[0]
        y, _, _ = buf.low_latency_combine(lx, topk, w, lh)
        out = torch.empty_like(x)
        y2 = buf.low_latency_combine(lx, topk, w, lh, out=out)[0]
    srcs, per_src = ref_ll(all_topk, rank, e_loc)
    ck.expect("ll_recv", lx.shape == (e_loc, world * TMAX, H) and count.dtype == torch.int32, "shapes")
    ck.expect("ll_recv", count.tolist() == [len(s) for s in srcs], f"recv_count {count.tolist()}")
    ck.expect("ll_recv", stats.tolist() == [2 * len(s) for s in srcs], "cumulative stats not incremented in place")
    ranges = lh.layout_range.tolist()
    want_ranges = [[(sum(c[:j]) << 32) | c[j] for j in range(world)] for c in per_src]
    ck.expect("ll_recv", ranges == want_ranges, f"layout_range {ranges} != {want_ranges}")
    ok_rows = True
    for le, rows in enumerate(srcs):
        info = lh.src_info[le].tolist()
        ok_rows &= info[: len(rows)] == rows and all(i == -1 for i in info[len(rows):])
        owners = [j for j, c in enumerate(per_src[le]) for _ in range(c)]
        want_rows = torch.cat([make_x(j, tok + 1)[tok:] for j, tok in zip(owners, rows)] + [torch.zeros(0, H)])
        ok_rows &= torch.equal(lx[le, : len(rows)].cpu(), want_rows) and bool((lx[le, len(rows):] == 0).all())
    ck.expect("ll_recv", ok_rows, "src_info / row contents / padding")
    ck.expect("ll_recv", torch.equal(kept, lx) and torch.equal(third, lx), "an earlier LL result was overwritten")
    wsum = torch.where(topk >= 0, w, 0.0)
    want_y = torch.zeros(t, H, device=dev)
    for kk in range(k):
        want_y += x * wsum[:, kk : kk + 1]
    ck.expect("ll_combine", torch.allclose(y, want_y, rtol=1e-6, atol=1e-6) and y2 is out
              and torch.equal(out, y), "LL combine != x * sum_k w")
    ck.expect("ll_combine", torch.allclose(y, x * wsum.sum(1, keepdim=True), rtol=1e-5), "LL combine != x * sum w")
    xb = x.bfloat16()
    lb, _, lhb, _, _ = buf.low_latency_dispatch(xb, topk, TMAX, experts, use_fp8=False)
    yb = buf.low_latency_combine(lb, topk, w, lhb)[0]
    ck.expect("ll_combine", yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), want_y, rtol=1e-2, atol=1e-2),
              "bf16 LL combine")
    # Overflow is caught from shapes, before any collective (every rank raises, nobody hangs).
    try:
        buf.low_latency_dispatch(torch.zeros(TMAX + 1, H, device=dev), torch.zeros(TMAX + 1, k, dtype=torch.long,
                                 device=dev), TMAX, experts, use_fp8=False)
        ck.expect("ll_no_sync", False, "T > Tmax did not raise")
    except ValueError:
        ck.expect("ll_no_sync", True, "")
    try:
        buf.low_latency_dispatch(x, topk, TMAX, experts)  # DeepEP's default use_fp8=True, but H % 128 != 0
        ck.expect("ll_no_sync", False, "use_fp8 with hidden 8 did not raise")
    except ValueError:
        pass
    _low_latency_fp8(ck, buf, rank, world, dev, topk, w, e_loc)


def _low_latency_fp8(ck, buf, rank, world, dev, topk, w, e_loc):
    """use_fp8=True: e4m3 values, float32 scales per 128 channels (column-major), dequantised rows
    within e4m3's 2^-4 relative step of the bf16 path, combine of the dequantised rows ~ x * sum w."""
    h, experts, t = 256, buf.num_experts, topk.shape[0]
    fbuf = EPBuffer(buf.group, experts, h, TMAX)
    x = (torch.randn(t, h, generator=torch.Generator().manual_seed(7 + rank)) * 3).to(dev)
    ref, ref_count, _, _, _ = fbuf.low_latency_dispatch(x, topk, TMAX, experts, use_fp8=False)
    with forbid_host_sync():
        (q, sc), count, fh, _, _ = fbuf.low_latency_dispatch(x, topk, TMAX, experts)
        deq = q.float() * sc.repeat_interleave(128, -1)
        y = fbuf.low_latency_combine(deq, topk, w, fh)[0]
        (_, sc2), _, _, _, _ = fbuf.low_latency_dispatch(x, topk, TMAX, experts, round_scale=True)
    ck.expect("ll_fp8", q.dtype == torch.float8_e4m3fn and q.shape == (e_loc, world * TMAX, h)
              and sc.shape == (e_loc, world * TMAX, 2) and sc.stride(-2) == 1, "dtypes / shapes / scale layout")
    ck.expect("ll_fp8", torch.equal(count, ref_count), "counts differ from the bf16 path")
    amax = float(x.abs().max()) if t else 1.0
    ck.expect("ll_fp8", bool(((deq - ref).abs() <= ref.abs() / 16 + amax * 1e-3).all()), "dequantised rows")
    want = x * torch.where(topk >= 0, w, 0.0).sum(1, keepdim=True)
    ck.expect("ll_fp8", torch.allclose(y, want, rtol=0.1, atol=amax * 0.02), f"fp8 combine err {_err(y, want)}")
    ck.expect("ll_fp8", torch.equal(torch.log2(sc2), torch.log2(sc2).round()), "round_scale: not powers of two")


def _err(a, b) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _moe(ck, buf, rank, world, dev, topk, w, experts, e_loc, kw):
    """Per-expert linear maps, identical on every rank; tokens random."""
    weights = torch.randn(experts, H, H, generator=torch.Generator().manual_seed(99)).to(dev) / H ** 0.5
    x = torch.randn(topk.shape[0], H, generator=torch.Generator().manual_seed(100 + rank)).to(dev)
    want = torch.zeros_like(x)
    for kk in range(topk.shape[1]):
        e = topk[:, kk].clamp(min=0)
        want += torch.where(topk[:, kk : kk + 1] >= 0, torch.bmm(x.unsqueeze(1), weights[e]).squeeze(1), 0.0) \
            * w[:, kk : kk + 1]
    first = rank * e_loc
    # Normal mode (vLLM's pattern): weight and sum over local experts, then the unweighted combine.
    rx, ridx, rw, _, h, _ = buf.dispatch(x, **kw)
    y = torch.zeros_like(rx)
    for le in range(e_loc):
        coef = torch.where(ridx == le, rw, 0.0).sum(1, keepdim=True)
        y += coef * (rx @ weights[first + le])
    got = buf.combine(y, h)[0]
    ck.expect("moe_normal", torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"max err {_err(got, want)}")
    # LL mode: experts on the masked layout, weighted combine.
    lx, _, lh, _, _ = buf.low_latency_dispatch(x, topk, TMAX, experts, use_fp8=False)
    ly = torch.stack([lx[le] @ weights[first + le] for le in range(e_loc)])
    got = buf.low_latency_combine(ly, topk, w, lh)[0]
    ck.expect("moe_ll", torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"max err {_err(got, want)}")


def graph_checks(rank: int, world: int, dev: torch.device) -> dict[str, list[str]]:
    """LL dispatch+combine and num_worst_tokens dispatch+combine captured in a CUDA graph: replays
    with fresh inputs copied into the static ones equal the eager calls (CUDA only)."""
    ck = Checker()
    experts, k, t = 4 * world, 3, 10
    buf = EPBuffer(dist.group.WORLD, experts, H, TMAX)

    def inputs(seed):
        topk, w = make_routing(rank, t, experts, k, seed)
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(seed * 10 + rank))
        return x.to(dev), topk.to(dev), w.to(dev)

    sx, stopk, sw = inputs(0)

    def ll_step():
        lx, _, lh, _, _ = buf.low_latency_dispatch(sx, stopk, TMAX, experts, use_fp8=False)
        return buf.low_latency_combine(lx * 2, stopk, sw, lh)[0]

    def worst_step():
        rx, _, _, _, h, _ = buf.dispatch(sx, topk_idx=stopk, topk_weights=sw, num_worst_tokens=world * TMAX)
        return buf.combine(rx * 2, h)[0]

    for name, step in (("ll_capture", ll_step), ("worst_capture", worst_step)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (NCCL setup, allocator)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for seed in (1, 2):
            for static, fresh in zip((sx, stopk, sw), inputs(seed)):
                static.copy_(fresh)
            graph.replay()
            want = step()
            ck.expect(name, torch.equal(out, want), f"replay with seed {seed} differs from eager")
    return {f"graph/{c}": v for c, v in ck.failures.items()}


def gpu_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """torch.multiprocessing.spawn target for the NCCL run: one process per GPU, results as JSON."""
    from raylight.parallel.state import init_distributed, leave_distributed

    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", f"cuda:{rank}", timeout_s=120)
    try:
        res = ep_contract_checks(rank, world, device=f"cuda:{rank}")
        res.update(graph_checks(rank, world, torch.device(f"cuda:{rank}")))
        dist.barrier()
    finally:
        leave_distributed()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
