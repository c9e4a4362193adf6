"""MODELED (not measured) GPU time of DeiT-T/S/B at batch 256 in bfloat16: dense vs SPViT-accelerated.

    python benchmarks/roofline.py [--report CSV] [--gemm-efficiency 0.7] [--markdown]

No GPU ran any of this. For every op of the forward pass it counts the bytes that must move and the FLOPs,
gives the A100 / H100 floor (whichever of bytes / bandwidth and FLOPs / peak binds), and a modeled time:
  * GEMMs (qkv, proj, fc1, fc2, patch embedding, head): FLOPs / (tensor peak x --gemm-efficiency), the same
    efficiency for the dense and the accelerated model (cuBLAS is not modeled further).
  * LayerNorms, GELU, residual adds (unfused, as timm runs them eagerly): their bytes / bandwidth.
  * varlen_attention, token_scores: from the offline kernel report (benchmarks/kernel_report.py, sm_80 SASS
    for the A100, sm_90 for the H100): the tiles the front end picks (padded rows and keys), the loop-body
    instructions x loop trips, split into the FP32 pipe, the MUFU and all issue slots; the modeled time is the
    largest of bytes / bandwidth, padded tensor FLOPs / peak, FP32 instructions / FP32 lanes, MUFU
    instructions / MUFU lanes and all instructions / issue slots. Bytes count each tensor once from DRAM
    (re-reads of K/V tiles, token_scores' second pass over its rows of x and its scratch are assumed to hit
    L2; the scratch's write-back counts). token_scores rows also give l2_working_set_mb: the x rows that the
    resident per-head programs (the report's blocks_per_sm on every SM) hold between their two passes, to
    set against the L2 (A100 40 MB, H100 50 MB: the two datasheets).
  * prune_pack: bytes only (its floor), as its gathers are bandwidth-bound.
Occupancy, latency, launch overheads, L2 misses and clocks below boost are not modeled: real times will be
longer; the ratios between ops and between dense and accelerated are the useful part.

Model: 12 blocks; selectors before blocks 3, 6, 9 keep round(0.617 / 0.369 / 0.137 x 196) patches with "mean"
packages (SPViT's DeiT settings, spvit_kernels/models/config.py), so blocks see 197, 123, 75 and 31 tokens.

Peak figures (datasheets; dense tensor throughput, no sparsity):
  A100 SXM4 80GB: HBM2e 2,039 GB/s, BF16 tensor 312 TFLOPS, FP32 19.5 TFLOPS, 108 SMs at 1.41 GHz (NVIDIA
    A100 Tensor Core GPU datasheet; SM count and boost clock: NVIDIA A100 architecture whitepaper).
  H100 SXM5 80GB: HBM3 3,350 GB/s, BF16 tensor 989 TFLOPS, FP32 67 TFLOPS, 132 SMs (NVIDIA H100 Tensor Core
    GPU datasheet; SM count: NVIDIA H100 architecture whitepaper); clock 1.98 GHz = FP32 FLOPS / (132 SMs x
    128 lanes x 2).
  Per SM and clock: 128 issue slots (4 schedulers x 32 threads); FP32 lanes 64 (A100) / 128 (H100); 16 MUFU
  lanes (CUDA C Programming Guide, arithmetic instruction throughput, compute capability 8.0 / 9.0).

Writes benchmarks/results/roofline-MODELED.csv (with commit and date, and the report's commit).
"""

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    bandwidth: float  # bytes/s
    tensor_flops: float  # bf16 dense
    sms: int
    clock: float  # Hz
    fp32_lanes: int  # per SM and clock
    l2_bytes: float
    issue: int = 128
    mufu_lanes: int = 16


GPUS = [Gpu("A100-SXM4-80GB", 80, 2039e9, 312e12, 108, 1.41e9, 64, 40e6),
        Gpu("H100-SXM5-80GB", 90, 3350e9, 989e12, 132, 1.98e9, 128, 50e6)]
MODELS = [("DeiT-T", 192, 3), ("DeiT-S", 384, 6), ("DeiT-B", 768, 12)]
BATCH = 256
PATCHES = 196
DEPTH = 12
SELECTOR_LAYERS = (3, 6, 9)
KEEP_RATIOS = (0.617, 0.369, 0.137)
BYTES = 2  # bfloat16
REPORT = os.path.join(common.RESULTS_DIR, "kernel_report-offline-sm80-sm90.csv")


def read_report(path):
    """(rows, metadata) of the kernel report CSV."""
    meta, lines = {}, []
    with open(path) as f:
        for line in f:
            if line.startswith("# "):
                k, _, v = line[2:].partition(": ")
                meta[k] = v.strip()
            else:
                lines.append(line)
    return list(csv.DictReader(lines)), meta


def _config(row):
    return dict(kv.split("=") for kv in row["config"].split() if "=" in kv)


def report_row(report, kernel, arch, match):
    for r in report:
        if r["kernel"] == kernel and int(r["arch"]) == arch and r["dtype"] == "bfloat16" and match(r):
            return r
    raise LookupError(f"no {kernel} sm_{arch} bfloat16 row for this case in the kernel report")


def issue_time(gpu, trips, row):
    """(seconds, bound) of `trips` executions of the row's loop bodies: all slots, FP32 pipe, MUFU."""
    lanes = 32 * int(row["num_warps"]) * trips
    per_sm = gpu.sms * gpu.clock
    times = {"issue": int(row["sass_loop"]) * lanes / (per_sm * gpu.issue),
             "fp32 pipe": int(row["loop_fp32"]) * lanes / (per_sm * gpu.fp32_lanes),
             "MUFU": int(row["loop_mufu"]) * lanes / (per_sm * gpu.mufu_lanes)}
    bound = max(times, key=times.get)
    return times[bound], bound


def op_row(gpu, model, variant, op, tokens, count, flops, bytes_floor, *, t_model=None, bound=None,
           gemm_eff=None, bytes_moved=None):
    """One CSV row: floor = max(bytes / bandwidth, FLOPs / tensor peak); model as given (or derived).
    bytes_moved (the modeled DRAM bytes where they exceed the floor's, e.g. scratch): their time over the floor
    in the column bytes_over_floor, the least model_over_floor can be whatever the instructions."""
    t_bytes = bytes_floor / gpu.bandwidth
    t_flops = flops / gpu.tensor_flops
    floor = max(t_bytes, t_flops)
    if t_model is None:
        if gemm_eff is not None:
            t_model, bound = flops / (gpu.tensor_flops * gemm_eff), f"tensor x {gemm_eff}"
        else:
            t_model, bound = t_bytes, "bytes"
    return dict(gpu=gpu.name, model=model, variant=variant, op=op, tokens_per_image=tokens, count=count,
                gflop=round(count * flops / 1e9, 3), mbytes=round(count * bytes_floor / 1e6, 3),
                floor_us=round(count * floor * 1e6, 2), modeled_us=round(count * t_model * 1e6, 2),
                model_over_floor=round(t_model / floor, 2) if floor else "", bound=bound,
                bytes_over_floor=round(bytes_moved / gpu.bandwidth / floor, 2) if bytes_moved and floor else "")


def attention(gpu, report, model, variant, n, C, H, count):
    d = C // H
    bucket = next(b for b in (16, 32, 64, 96, 256) if n <= b)
    row = report_row(report, "varlen_attention", gpu.arch,
                     lambda r: f"d={d} n<={bucket} " in r["config"] + " ")
    cfg = _config(row)
    bm, bn = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    mt, nt = math.ceil(n / bm), math.ceil(n / bn)
    flops = 4 * BATCH * n * n * C  # q k^T and p v, useful work
    padded = 4 * BATCH * H * (mt * bm) * (nt * bn) * d
    bytes_floor = 4 * BATCH * n * C * BYTES  # q, k, v read, out written
    t_issue, bound = issue_time(gpu, BATCH * H * mt * nt, row)
    times = {"bytes": bytes_floor / gpu.bandwidth, "padded tensor FLOPs": padded / gpu.tensor_flops, bound: t_issue}
    bound = max(times, key=times.get)
    r = op_row(gpu, model, variant, f"varlen_attention ({bm}x{bn} tiles)", n, count, flops, bytes_floor,
               t_model=times[bound], bound=bound)
    return r


def block_rows(gpu, report, model, variant, n, C, H, count, gemm_eff):
    T = BATCH * n
    return [
        op_row(gpu, model, variant, "GEMMs (qkv, proj, fc1, fc2)", n, count, 24 * T * C * C,
               BYTES * T * C * 18 + BYTES * 12 * C * C, gemm_eff=gemm_eff),
        attention(gpu, report, model, variant, n, C, H, count),
        # LN1, LN2 (read + write C), GELU (read + write 4C), two residual adds (read 2, write 1).
        op_row(gpu, model, variant, "LayerNorms, GELU, residual adds", n, count, 0, BYTES * T * C * (4 + 16 + 6 + 6)),
    ]


def selector_rows(gpu, report, model, n_in, n_out, packages_in, C, H):
    R = BATCH * n_in
    head = report_row(report, "token_scores_head", gpu.arch, lambda r: f"C={C} H={H} " in r["config"])
    comb = report_row(report, "token_scores_combine", gpu.arch, lambda r: f"C={C} H={H} " in r["config"])
    bm, br = int(_config(head)["BLOCK_M"]), int(_config(comb)["BLOCK_R"])
    floor_bytes = R * C * BYTES + 2 * 4 * R
    scratch = 3 * (R * H * 4 * 2)  # l0 - l1, h_bar and rstd per row and head, written and read
    t1, b1 = issue_time(gpu, BATCH * H * math.ceil((n_in - 1) / bm), head)
    t2, _ = issue_time(gpu, BATCH * math.ceil(n_in / br), comb)
    times = {"bytes": (floor_bytes + scratch) / gpu.bandwidth, b1: t1 + t2}
    bound = max(times, key=times.get)
    flops = 0  # tiny matmuls on d = 64: counted in the instruction model
    ts = op_row(gpu, model, "accelerated", "token_scores", n_in, 1, flops, floor_bytes, t_model=times[bound],
                bound=bound, bytes_moved=floor_bytes + scratch)
    resident = min(BATCH * H, int(head["blocks_per_sm"]) * gpu.sms)  # per-head programs on the GPU at once
    ts["l2_working_set_mb"] = round(resident * (n_in - 1) * (C // H) * BYTES / 1e6, 1)
    ts["l2_mb"] = gpu.l2_bytes / 1e6
    pp_bytes = R * C * BYTES + BATCH * n_out * C * BYTES + 3 * 4 * R
    pp = op_row(gpu, model, "accelerated", "prune_pack", f"{n_in}->{n_out}", 1, 0, pp_bytes)
    return [ts, pp]


def selector_stages():
    """(stage, block index, tokens in, tokens out) of each selector: cls + kept patches + one package per stage."""
    n = 1 + PATCHES
    for s, layer in enumerate(SELECTOR_LAYERS):
        n_out = 1 + round(KEEP_RATIOS[s] * PATCHES) + (s + 1)
        yield s, layer, n, n_out
        n = n_out


def model_rows(gpu, report, model, C, H, gemm_eff):
    embed_flops = 2 * BATCH * PATCHES * 768 * C
    embed_bytes = BATCH * (3 * 224 * 224 * 4 + (PATCHES + 1) * C * BYTES)
    head_flops = 2 * BATCH * C * 1000
    rows = []
    for variant in ("dense", "accelerated"):
        rows.append(op_row(gpu, model, variant, "patch embedding", 197, 1, embed_flops, embed_bytes,
                           gemm_eff=gemm_eff))
        if variant == "dense":
            rows += block_rows(gpu, report, model, variant, 197, C, H, DEPTH, gemm_eff)
        else:
            n, start = 197, 0
            for s, layer, n_in, n_out in selector_stages():
                rows += block_rows(gpu, report, model, variant, n_in, C, H, layer - start, gemm_eff)
                rows += selector_rows(gpu, report, model, n_in, n_out, s, C, H)
                n, start = n_out, layer
            rows += block_rows(gpu, report, model, variant, n, C, H, DEPTH - start, gemm_eff)
        rows.append(op_row(gpu, model, variant, "head", 1, 1, head_flops, BYTES * C * 1000, gemm_eff=gemm_eff))
    return rows


def summary(rows):
    """{(gpu, model): dict(dense_us, accel_us, ...)} from the op rows."""
    out = {}
    for r in rows:
        s = out.setdefault((r["gpu"], r["model"]), dict(dense_us=0.0, accelerated_us=0.0, selector_us=0.0,
                                                        token_scores_ratio=[]))
        s[f"{r['variant']}_us"] += r["modeled_us"]
        if r["op"] in ("token_scores", "prune_pack"):
            s["selector_us"] += r["modeled_us"]
        if r["op"] == "token_scores":
            s["token_scores_ratio"].append(r["model_over_floor"])
    return out


def markdown(summ):
    lines = ["| GPU | model | dense img/s | accelerated img/s | speedup | selectors (token_scores + prune_pack) "
             "| token_scores modeled / floor, stages 1/2/3 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (gpu, model), s in summ.items():
        dense, accel = BATCH / (s["dense_us"] * 1e-6), BATCH / (s["accelerated_us"] * 1e-6)
        ratio = "/".join(f"{x:.1f}" for x in s["token_scores_ratio"])
        lines.append(f"| {gpu} | {model} | {dense:,.0f} | {accel:,.0f} | {accel / dense:.2f}x | "
                     f"{100 * s['selector_us'] / s['accelerated_us']:.1f}% | {ratio} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default=REPORT, help="kernel report CSV (benchmarks/kernel_report.py)")
    parser.add_argument("--gemm-efficiency", type=float, default=0.7,
                        help="fraction of the tensor peak the GEMMs reach, dense and accelerated alike")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args()
    report, rmeta = read_report(args.report)
    rows = []
    for gpu in GPUS:
        for model, C, H in MODELS:
            rows += model_rows(gpu, report, model, C, H, args.gemm_efficiency)
    summ = summary(rows)
    for (gpu, model), s in summ.items():
        for variant in ("dense", "accelerated"):
            rows.append(dict(gpu=gpu, model=model, variant=variant, op="TOTAL",
                             tokens_per_image="", count=1, gflop="", mbytes="", floor_us="",
                             modeled_us=round(s[f"{variant}_us"], 2), model_over_floor="", bytes_over_floor="",
                             bound=f"{BATCH / (s[f'{variant}_us'] * 1e-6):.0f} images/s"))
    common.write_csv("roofline", "cpu", rows, label="MODELED", extra_meta={
        "what": "MODELED, not measured: bytes, FLOPs and SASS instruction counts on datasheet peaks",
        "batch": BATCH, "dtype": "bfloat16", "gemm_efficiency": args.gemm_efficiency,
        "kernel_report": os.path.relpath(args.report, os.path.dirname(common.RESULTS_DIR)),
        "kernel_report_commit": rmeta.get("commit", "unknown"), "kernel_report_date": rmeta.get("date", "")})
    print(markdown(summ))


if __name__ == "__main__":
    main()
