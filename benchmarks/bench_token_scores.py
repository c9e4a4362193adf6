"""Benchmark token_scores (the SPViT selector) at the first pruning stage of DeiT-T/S/B.

Providers (each checked against the reference backend before anything is timed):
  reference  spvit_kernels' reference backend (PyTorch, image by image)
  module     the models' TokenSelector.score_masked: the batched PyTorch selector of the reference model
             (padded (B, N-1, C) batch, per-head loop-free but unfused: ~25 kernels)
  triton     the fused Triton backend (--device cuda)
  cpu        the C++ backend (--device cpu)

Shapes: B images (1, 64, 256) of 197 rows (cls + 196 patches, no package row yet), C/H = 192/3, 384/6,
768/12 (DeiT-T/S/B). Bytes that must move, counted once: one read of the tokens (T x C) and the two float32
outputs (T each). GB/s is compared with the device copy bandwidth measured in the same run.

    python benchmarks/bench_token_scores.py [--device cpu|cuda] [--quick] [--dtype bfloat16] [--threads N]
        [--batches 1 64 256]
Writes benchmarks/results/token_scores-<device>.csv and .png. On a CPU the reference takes ~1 ms per image
per thread, so --quick stops at B = 64 (the CSV says which batches ran). On a CPU every provider is timed in
3 interleaved rounds and keeps its best median (--rounds), since other processes may share the cores.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from spvit_kernels import ops  # noqa: E402

WIDTHS = [("DeiT-T", 192, 3), ("DeiT-S", 384, 6), ("DeiT-B", 768, 12)]
TOKENS = 197  # cls + 14 x 14 patches
# (atol, rtol) of the providers against the reference backend (which computes in float32).
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (0.1, 0.05)}


def make_selector(C, H, device):
    """A TokenSelector with random weights large enough that the scores vary by O(1)."""
    from spvit_kernels.models.selector import TokenSelector

    sel = TokenSelector(C, H, device=device)
    common.spread_selector(sel, torch.Generator().manual_seed(0))
    return sel


def make_tokens(B, C, dtype, device):
    gen = torch.Generator().manual_seed(1)
    x = (1.5 * torch.randn(B * TOKENS, C, generator=gen) + torch.randn(1, C, generator=gen)).to(dtype).to(device)
    cu = (torch.arange(B + 1, dtype=torch.int32) * TOKENS).to(device)
    return x, cu


def module_scores(sel, x, B):
    """TokenSelector.score_masked on the dense batch (every non-cls row takes part)."""
    S = x.view(B, TOKENS, -1)[:, 1:]
    rows = torch.ones(S.shape[:2], dtype=torch.bool, device=x.device)
    return sel.score_masked(S, rows)


def packed(out, B):
    """(B, TOKENS-1) module outputs -> packed (T,) like the op (cls rows +inf / 1)."""
    score, prob = out
    s = torch.full((B, TOKENS), float("inf"), device=score.device)
    p = torch.ones((B, TOKENS), device=score.device)
    s[:, 1:] = score.float()
    p[:, 1:] = prob.float()
    return s.reshape(-1), p.reshape(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="DeiT-S only, B up to 64, fewer repetitions")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 64 256 (--quick: 1 64)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timing rounds, providers interleaved, best median kept (default: 3 on cpu, 1 on cuda)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    widths = [w for w in WIDTHS if w[0] == "DeiT-S"] if args.quick else WIDTHS
    batches = args.batches or ([1, 64] if args.quick else [1, 64, 256])
    rounds = args.rounds or (3 if device == "cpu" else 1)

    fast = "triton" if device == "cuda" else "cpu"
    if fast not in ops.available_backends("token_scores"):
        sys.exit(f"the {fast!r} backend of token_scores is not usable here")
    ceilings = common.measure_ceilings(device)
    copy_gbs = ceilings["copy_GBps"]
    print(f"device {common.device_label(device)}  copy ceiling {copy_gbs} GB/s  {dtype}  "
          f"threads {torch.get_num_threads()}")

    rows = []
    for label, C, H in widths:
        sel = make_selector(C, H, device)
        w = sel.op_weights()
        for B in batches:
            x, cu = make_tokens(B, C, dtype, device)
            # No host synchronisation in the timed calls: the cu_seqlens here are known to be valid.
            providers = {
                "reference": lambda: ops.token_scores(x, cu, 0, H, *w, backend="reference"),
                "module": lambda: module_scores(sel, x, B),
                fast: lambda: ops.token_scores(x, cu, 0, H, *w, backend=fast),
            }
            with torch.no_grad(), ops.unchecked_seqlens():
                outs = {name: fn() for name, fn in providers.items()}
                outs["module"] = packed(outs["module"], B)
                atol, rtol = TOL[dtype]
                common.assert_close_providers(outs, "reference", atol=atol, rtol=rtol)
                # Rounds with the providers interleaved, keeping each one's best median: on a CPU shared with
                # other processes the load changes between rounds, and this keeps it from favouring either.
                times = {}
                for _ in range(rounds):
                    for name, fn in providers.items():
                        rep = 5 if (args.quick and name != fast) else None
                        times[name] = min(times.get(name, float("inf")), common.time_ms(fn, device, rep=rep))
            nbytes = x.numel() * x.element_size() + 2 * 4 * x.shape[0]
            for name, ms in times.items():
                gbs = nbytes / ms / 1e6
                rows.append({
                    "model": label, "C": C, "H": H, "B": B, "tokens": TOKENS, "dtype": str(dtype).replace("torch.", ""),
                    "provider": name, "ms": round(ms, 4), "GBps": round(gbs, 3),
                    "pct_copy_ceiling": round(100 * gbs / copy_gbs, 2),
                    "speedup_vs_reference": round(times["reference"] / ms, 2),
                    "speedup_vs_module": round(times["module"] / ms, 2), "bytes": nbytes,
                })
                print(f"{label} B={B:4d} {name:>9}: {ms:10.4f} ms  {gbs:8.3f} GB/s ({100 * gbs / copy_gbs:6.2f}% of copy)"
                      f"  x{times['reference'] / ms:6.2f} vs reference  x{times['module'] / ms:6.2f} vs module")
            del x, outs

    meta = dict(ceilings)
    meta.update({"batches": " ".join(map(str, batches)), "quick": str(args.quick), "rounds": str(rounds),
                 "stage": f"first selector: {TOKENS} rows per image, no package row"})
    if device == "cpu":
        meta["loadavg_1min"] = f"{os.getloadavg()[0]:.2f} (other processes share this CPU)"
    common.write_csv("token_scores", device, rows, extra_meta=meta)
    for r in rows:
        r["shape"] = f"{r['model']} B{r['B']}"
    common.plot_bars("token_scores", device, rows, x="shape", y="speedup_vs_reference", group="provider",
                     ylabel="speedup vs reference backend",
                     title=f"token_scores, {TOKENS} tokens, {dtype} (copy ceiling {copy_gbs} GB/s)")


if __name__ == "__main__":
    main()
