import torch, torch.nn.functional as F
from raylight.kernels import gemv as g
def t(f, n=50):
    for _ in range(5): f()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True); torch.cuda.synchronize(); s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n * 1000
for M in (8, 32):
    for N, K, silu in ((6144, 4096, 0), (4096, 4096, 0), (28672, 4096, 0), (4096, 14336, 1), (128256, 4096, 0)):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(M, K * (2 if silu else 1), device="cuda", dtype=torch.bfloat16)
        cfg = g.rows_config(N, K, M)
        tr = t(lambda: g.gemv_rows(x, w, silu_and_mul=bool(silu)))
        tc = t(lambda: F.linear(x[:, :K] * x[:, K:] if silu else x, w))
        print(M, N, K, silu, cfg, f"rows {tr:.1f} us, cublas {tc:.1f} us", flush=True)
