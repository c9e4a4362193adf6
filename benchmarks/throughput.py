"""End-to-end throughput: the dense backbone vs the reference SPViT model vs the accelerated one.

For each model (default DeiT-T/S/B; --models takes short names or any create_model name, e.g.
spvit_lvvit_s) and pruning mode:
  dense        the backbone alone (timm VisionTransformer, LV-ViT, timm PiT; same weights, no selectors)
  reference    the SPViT model in the official masked form (full token tensor, masked attention)
  accelerated  the same model after spvit_kernels.accelerate(): pruned ragged execution on the fused ops
Pruning modes: top-k at the model's default keep ratios (DeiT / LV-ViT: cumulative (0.617, 0.369, 0.137); PiT:
0.617, 0.369, 0.137 of stage 1, 2, 3's own grid), and threshold mode with
per-stage thresholds calibrated on a separate batch so that the mean keep matches those ratios.

Reported: images/s (batch / median time of several timed rounds after warm-up; the three providers take
turns within each round), peak memory (GPU), tokens per image after each stage, speedups, and each
provider's GFLOPs per image (benchmarks/flops.py) with the FLOP ceiling dense GFLOPs / provider GFLOPs:
the speedup over dense that the matmul work alone would allow. Before
timing, the accelerated model is checked against the reference: in float32 the logits must agree within
1e-4 of their scale (else nothing is timed; the selectors' weights are re-drawn with a trained-like spread so
that scores are not all within rounding of each other, see `spread_selectors`); in bf16 / fp16 a token whose score sits within rounding of
the decision boundary may flip, so top-1 agreement and the logit error are recorded, and only a gross
disagreement (> 25% of the logits' scale) stops the run.

Embedded defaults: on a GPU, bfloat16, batch 256, DeiT-T/S/B (the figure design section 7 names); on a
CPU, float32, batch 4, 5 timed runs, so that it finishes in a few minutes.

    python benchmarks/throughput.py [--device cuda|cpu] [--batch N] [--dtype bfloat16|float16|float32]
                                    [--models tiny,small,base,lvvit_s,pit_s] [--modes topk,threshold] [--runs N]
"""

import argparse
import copy
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from flops import forward_gflops  # noqa: E402

from spvit_kernels import accelerate  # noqa: E402
from spvit_kernels.models import calibrate_thresholds, create_model, list_models  # noqa: E402

# Short names for --models; any create_model name (list_models()) is accepted as well.
MODELS = {"tiny": "spvit_deit_tiny", "small": "spvit_deit_small", "base": "spvit_deit_base",
          "lvvit_s": "spvit_lvvit_s", "lvvit_m": "spvit_lvvit_m",
          "pit_ti": "spvit_pit_ti", "pit_xs": "spvit_pit_xs", "pit_s": "spvit_pit_s"}
LABELS = {"spvit_deit_": "DeiT-", "spvit_lvvit_": "LV-ViT-", "spvit_pit_": "PiT-"}  # plot labels
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 4 on a CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 GPU, float32 CPU")
    p.add_argument("--models", default="tiny,small,base",
                   help="comma list of short names (%s) or create_model names" % ", ".join(MODELS))
    p.add_argument("--modes", default="topk,threshold")
    p.add_argument("--runs", type=int, default=None, help="timed runs per provider (default 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs of each provider first (default 5 GPU, 2 CPU)")
    p.add_argument("--name", default="throughput", help="results file stem under benchmarks/results/")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.batch = args.batch or (256 if gpu else 4)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.runs = args.runs or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    return args


def _time_once(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns, device, runs, warmup):
    """Median seconds of each fn() over `runs` rounds, after `warmup` untimed calls of every fn.

    The providers take turns within each round, so a drift of the machine (clock, other processes, a cold
    allocator) hits all of them alike instead of whichever happens to be timed first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mib(fn, device):
    if device.type != "cuda":
        return "n/a"  # only measured on a GPU
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


def check_agreement(logits_ref, logits_acc, dtype):
    """Top-1 agreement and the largest logit difference, relative to the logits' scale."""
    top1 = (logits_ref.argmax(-1) == logits_acc.argmax(-1)).float().mean().item()
    scale = logits_ref.float().abs().max().item() or 1.0
    err = (logits_ref.float() - logits_acc.float()).abs().max().item() / scale
    limit = 1e-4 if dtype == torch.float32 else 0.25
    return top1, err, limit


def spread_selectors(model, seed=0):
    """Re-draw the selectors' weights with the spread of trained ones (`common.spread_selector`, as
    bench_token_scores does).

    Fresh selectors (the official init, std 0.02) give keep scores within ~1e-5 of each other, where float32
    rounding alone decides the top-k order: the reference model's PyTorch float32 selector is ~1e-7 off the
    float64 value there, the C++ / Triton kernels ~1e-11, so the two models would keep different tokens at a
    near tie and the agreement check below would measure rounding, not the kernels. Timing does not depend on
    the values (top-k keeps a fixed count; threshold mode is calibrated)."""
    gen = torch.Generator().manual_seed(seed)
    for sel in model.selectors:
        common.spread_selector(sel, gen)


def build(name, mode, device, dtype, calib_images):
    model = create_model(name, pruning=mode)
    spread_selectors(model)
    model = model.to(device=device, dtype=dtype).eval()
    if mode == "threshold":
        with torch.inference_mode():
            calibrate_thresholds(model, calib_images)  # per-stage thresholds: mean keep = the keep ratios
    return model


def bench_model(name, mode, args, device, dtype, bar):
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype)
    calib = torch.randn(min(args.batch, 64), 3, 224, 224, device=device, dtype=dtype)
    torch.manual_seed(0)
    reference = build(name, mode, device, dtype, calib)
    accelerated = accelerate(copy.deepcopy(reference))
    dense = reference.vit  # the same backbone (timm ViT, LV-ViT), without selectors
    rows = []
    with torch.inference_mode():
        logits_ref, info_ref = reference(images, return_info=True)
        logits_acc, info_acc = accelerated(images, return_info=True)
        top1, err, limit = check_agreement(logits_ref, logits_acc, dtype)
        if err > limit:
            raise SystemExit(f"{name} {mode}: accelerated disagrees with the reference (top-1 agreement {top1:.3f}, "
                             f"max logit error {err:.2e} of scale) - not timing it")
        tokens = [round(float(t), 1) for t in info_acc["num_tokens"].float().mean(dim=1)]
        models = {"dense": dense, "reference": reference, "accelerated": accelerated}
        providers = {p: functools.partial(model, images) for p, model in models.items()}
        gflops = {p: forward_gflops(providers[p], model) / args.batch for p, model in models.items()}
        seconds = time_interleaved(providers, device, args.runs, args.warmup)
        for provider, fn in providers.items():
            rows.append({
                "model": name, "mode": mode, "provider": provider, "batch": args.batch,
                "dtype": str(dtype).replace("torch.", ""), "images_per_s": round(args.batch / seconds[provider], 1),
                "ms_per_batch": round(seconds[provider] * 1e3, 2), "peak_mem_MiB": peak_memory_mib(fn, device),
                "gflops_per_image": round(gflops[provider], 3),
                "flop_ceiling_vs_dense": round(gflops["dense"] / gflops[provider], 2),
                "tokens_per_stage": "/".join(str(t) for t in tokens) if provider == "accelerated" else "",
                "top1_agreement": round(top1, 4) if provider == "accelerated" else "",
                "max_rel_logit_err": f"{err:.2e}" if provider == "accelerated" else "",
            })
            bar.update(1)
    by = {r["provider"]: r["images_per_s"] for r in rows}
    for r in rows:
        r["speedup_vs_dense"] = round(r["images_per_s"] / by["dense"], 2)
        r["speedup_vs_reference"] = round(r["images_per_s"] / by["reference"], 2)
    return rows


def print_table(rows):
    cols = ["model", "mode", "provider", "images_per_s", "ms_per_batch", "peak_mem_MiB", "speedup_vs_dense",
            "flop_ceiling_vs_dense", "speedup_vs_reference", "tokens_per_stage"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    models = [MODELS.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in models:
        if m not in list_models():
            raise SystemExit(f"--models: unknown model {m!r}; expected some of {sorted(MODELS)} or {list_models()}")
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = None
    total = len(models) * len(modes) * 3
    bar = tqdm(total=total, desc="providers timed") if tqdm else _NoBar()
    print(f"device {common.device_label(device)}, {args.dtype}, batch {args.batch}, {args.runs} timed runs "
          f"after {args.warmup} warm-up")
    rows = []
    for name in models:
        for mode in modes:
            rows += bench_model(name, mode, args, device, dtype, bar)
    bar.close()
    print_table(rows)
    meta = {"batch": args.batch, "dtype": args.dtype, "runs": args.runs, "warmup": args.warmup}
    common.write_csv(args.name, device, rows, meta)
    plot_rows = [dict(r, label=f"{_label(r['model'])} {r['mode']}") for r in rows]
    common.plot_bars(args.name, device, plot_rows, x="label", y="images_per_s", group="provider",
                     ylabel="images / s", title=f"SPViT end to end, {args.dtype}, batch {args.batch}")
    return rows


def _label(name):
    for prefix, short in LABELS.items():
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return name


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


if __name__ == "__main__":
    main()
