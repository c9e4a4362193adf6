"""Benchmark prune_pack (top-k mode, package="mean") at SPViT-DeiT stage shapes.

Providers (each checked against the reference backend before timing):
  reference    spvit_kernels' reference backend (PyTorch, image by image)
  torch_dense  batched PyTorch for equal-length images: stable sort, gather, masked weighted sum (bmm)
  cuda         the CUDA C++ backend (--device cuda)
  cpu          the C++ backend (--device cpu)

Shapes: B images (256) of [cls, n candidates, P old packages], stages (non-cls rows -> kept candidates)
196->121 (P 0), 122->72 (P 1), 74->27 (P 2), C in 192 / 384 / 768.
Bytes that must move, counted once: every input row read (kept rows copied, dropped rows pooled, cls and
package rows copied), keep_score of the candidates, keep_prob of the dropped ones, every output row written,
src_index and cu_seqlens_out. GB/s is compared with the device copy bandwidth measured in the same run.

    python benchmarks/bench_prune_pack.py [--device cpu|cuda] [--quick] [--batch B] [--dtype bfloat16] [--threads N]
                                         [--name STEM]
Writes benchmarks/results/<STEM, default prune_pack>-<device>.csv and .png.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from spvit_kernels import ops  # noqa: E402
from spvit_kernels.ops import _registry  # noqa: E402

# (label, candidates n, old packages P, kept)
STAGES = [("196->121", 196, 0, 121), ("122->72", 121, 1, 72), ("74->27", 72, 2, 27)]
CHANNELS = [192, 384, 768]


def make_inputs(B, n, P, C, dtype, device):
    N = 1 + n + P
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B * N, C, generator=gen).to(dtype).to(device)
    cu = (torch.arange(B + 1, dtype=torch.int32) * N).to(device)
    score = torch.randn(B * N, generator=gen).to(device)
    prob = torch.rand(B * N, generator=gen).to(device)
    return x, cu, score, prob


def torch_dense(x, cu, score, prob, P, num_keep):
    """Batched PyTorch top-k prune + mean pooling for equal-length images (what a user would write)."""
    B = cu.shape[0] - 1
    C = x.shape[1]
    N = x.shape[0] // B
    n = N - 1 - P
    xb = x.view(B, N, C)
    cand = xb[:, 1:1 + n]
    s = score.view(B, N)[:, 1:1 + n]
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :num_keep]
    kept_idx = torch.sort(order, dim=1).values  # original order
    kept = torch.gather(cand, 1, kept_idx[:, :, None].expand(B, num_keep, C))
    drop = torch.ones(B, n, dtype=torch.bool, device=x.device)
    drop.scatter_(1, kept_idx, False)
    w = prob.view(B, N)[:, 1:1 + n] * drop
    pooled = torch.bmm(w[:, None, :], cand.float()).squeeze(1)  # (B, C) fp32
    total = w.sum(dim=1, keepdim=True)
    pooled = torch.where(total != 0, pooled / total, torch.zeros_like(pooled))
    out = torch.cat([xb[:, :1], kept, xb[:, 1 + n:], pooled.to(x.dtype)[:, None]], dim=1)
    rows = out.shape[1]
    base = (torch.arange(B, device=x.device) * N)[:, None]
    src = torch.cat([base, base + 1 + kept_idx, base + 1 + n + torch.arange(P, device=x.device)[None].expand(B, P),
                     torch.full((B, 1), -1, device=x.device, dtype=torch.int64) - base], dim=1)
    src[:, -1] = -1
    cu_out = (torch.arange(B + 1, device=x.device, dtype=torch.int32) * rows)
    return out.reshape(B * rows, C), cu_out, src.reshape(-1)


def moved_bytes(B, n, P, C, k, es):
    N, rows_out = 1 + n + P, 1 + k + P + 1
    rows = B * N * C * es + B * rows_out * C * es
    scores = B * n * 4 + B * (n - k) * 4
    index = B * rows_out * 8 + (B + 1) * 4
    return rows + scores + index


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one channel count, fewer repetitions")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--name", default="prune_pack", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    channels = [384] if args.quick else CHANNELS
    B = args.batch

    ceilings = common.measure_ceilings(device)
    copy_gbs = ceilings["copy_GBps"]
    print(f"device {common.device_label(device)}  copy ceiling {copy_gbs} GB/s  B={B} {dtype}")

    fast = "cuda" if device == "cuda" else "cpu"
    providers = {
        "reference": lambda a, P, k: ops.prune_pack(*a, P, "topk", num_keep=k, backend="reference"),
        "torch_dense": lambda a, P, k: torch_dense(*a, P, k),
    }
    if fast in _registry._BACKENDS["prune_pack"]:
        providers[fast] = lambda a, P, k: ops.prune_pack(*a, P, "topk", num_keep=k, backend=fast)
    else:
        print(f"the {fast!r} backend is not in this build: timing the PyTorch providers only")

    rows = []
    for C in channels:
        for label, n, P, k in STAGES:
            a = make_inputs(B, n, P, C, dtype, device)
            outs = {name: fn(a, P, k) for name, fn in providers.items()}
            tol = 2e-2 if dtype == torch.bfloat16 else 2e-3 if dtype == torch.float16 else 1e-5
            common.assert_close_providers(outs, "reference", atol=tol, rtol=tol)
            nbytes = moved_bytes(B, n, P, C, k, a[0].element_size())
            times = {}
            for name, fn in providers.items():
                rep = 5 if (name == "reference" and args.quick) else None
                times[name] = common.time_ms(lambda fn=fn: fn(a, P, k), device, rep=rep)
            for name, ms in times.items():
                gbs = nbytes / ms / 1e6
                rows.append({
                    "stage": label, "C": C, "B": B, "dtype": str(dtype).replace("torch.", ""), "provider": name,
                    "ms": round(ms, 4), "GBps": round(gbs, 2), "pct_copy_ceiling": round(100 * gbs / copy_gbs, 1),
                    "speedup_vs_reference": round(times["reference"] / ms, 2),
                    "speedup_vs_torch_dense": round(times["torch_dense"] / ms, 2), "bytes": nbytes,
                })
                print(f"{label:>9} C={C:4d} {name:>12}: {ms:9.4f} ms  {gbs:8.2f} GB/s "
                      f"({100 * gbs / copy_gbs:5.1f}% of copy)  x{times['reference'] / ms:6.2f} vs reference  "
                      f"x{times['torch_dense'] / ms:6.2f} vs torch_dense")
            del a, outs

    meta = dict(ceilings)
    meta.update({"mode": "topk", "package": "mean", "quick": str(args.quick)})
    common.write_csv(args.name, device, rows, extra_meta=meta)
    for r in rows:
        r["shape"] = f"{r['stage']} C{r['C']}"
    common.plot_bars(args.name, device, rows, x="shape", y="GBps", group="provider", ylabel="GB/s",
                     title=f"prune_pack top-k, B={B} {dtype} (copy ceiling {copy_gbs} GB/s)")


if __name__ == "__main__":
    main()
