"""Offline kernel report: every GPU kernel compiled for sm_80 and sm_90 without a GPU, read from its SASS.

    python benchmarks/kernel_report.py [--so PATH] [--quick]

Rows (spvit_kernels/kernel_report.py explains each column):
  varlen_attention  the Triton kernel in every configuration the front end picks: float16 / bfloat16 /
                    float32, head dims 32 / 64 / 80 / 96 / 128, one max_seqlen per tile bucket (16, 32, 64, 96,
                    256: images of 1-16, 17-32, 33-64, 65-96 and 97-256 tokens).
  token_scores      the Triton per-head and combine kernels for the selector widths of DeiT-T/S/B (C/H 192/3,
                    384/6, 768/12) and LV-ViT-S/M (384/6, 512/8) in the three token dtypes.
  policy_attention  the Triton training-attention kernels (forward, key-tile and query-tile backward) in the three
                    dtypes, head dims 32 / 64 / 128, sequences of 16, 75 and 197 tokens.
  selector_train    the Triton training-selector kernels (forward per-head and combine, backward combine and
                    per-head) for DeiT-S (C/H 384/6, its first stage's 196 rows) and for head dim 128 (C/H
                    768/6) in the three dtypes.
  add_layer_norm    the Triton residual add + LayerNorm kernels (forward, backward) of the training block under
                    bf16 autocast (float32 stream, bf16 branch and output) at DeiT-T/S/B widths (192, 384, 768),
                    with and without the per-row branch scale (stochastic depth), and with float16 / float32
                    streams at DeiT-S's.
  gelu_mlp          the Triton GEMMs of the training MLP with GELU in their epilogues (fc1 writing u and gelu(u),
                    fc1 writing gelu(u) alone as a no_grad forward does, fc2's input gradient times gelu'(u)) in
                    the three dtypes.
  prune_pack        the CUDA C++ kernels of the built extension (--so, default: the imported one; skipped
                    when it was built without CUDA).
Extra column sass_per_row_head (token_scores' per-head kernel): SASS instructions in its row loops x threads
/ rows per tile = thread instructions per (row, head), the figure benchmarks/roofline.py turns into issue
time. Writes benchmarks/results/kernel_report-offline-sm80-sm90.csv with commit and date. TRITON_INTERPRET
must not be 1. About 3 minutes on one core (150 varlen_attention compiles); --quick: bfloat16 only.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from spvit_kernels import kernel_report as kr  # noqa: E402

ARCHS = (80, 90)
HEAD_DIMS = (32, 64, 80, 96, 128)
BUCKETS = (16, 32, 64, 96, 256)  # one max_seqlen per varlen_attention tile bucket
# (model, C, H) of the selector: DeiT-T/S/B, LV-ViT-S/M.
SELECTOR_WIDTHS = [("DeiT-T", 192, 3), ("DeiT-S", 384, 6), ("DeiT-B", 768, 12), ("LV-ViT-S", 384, 6),
                   ("LV-ViT-M", 512, 8)]
LABEL = "offline-sm80-sm90"


def _dtype_name(dt):
    return str(dt).replace("torch.", "")


def token_scores_rows(dtypes):
    rows = []
    for arch in ARCHS:
        for dt in dtypes:
            for model, C, H in SELECTOR_WIDTHS:
                for stats, const in kr.token_scores_stats(arch, dt, C, H):
                    row = dict(stats.row(), models=model, dtype=_dtype_name(dt))
                    if "BLOCK_M" in const:  # the per-head kernel: loops over 16-row tiles
                        row["sass_per_row_head"] = stats.sass_loop * stats.num_warps * 32 // const["BLOCK_M"]
                    rows.append(row)
    # LV-ViT-S has DeiT-S's selector width: one row per compiled kernel, listing both models.
    merged = {}
    for row in rows:
        key = (row["kernel"], row["config"], row["arch"])
        if key in merged:
            merged[key]["models"] += "/" + row["models"]
        else:
            merged[key] = row
    return list(merged.values())


def varlen_rows(dtypes):
    rows = []
    for arch in ARCHS:
        for dt in dtypes:
            for d in HEAD_DIMS:
                for n in BUCKETS:
                    stats, _ = kr.varlen_attention_stats(arch, dt, d, n)
                    rows.append(dict(stats.row(), models=f"head dim {d}", dtype=_dtype_name(dt)))
    return rows


POLICY_LENGTHS = (16, 75, 197)  # SPViT training: one tile, the last stage's rows, DeiT's full sequence


def policy_rows(dtypes):
    rows = []
    for arch in ARCHS:
        for dt in dtypes:
            for d in (32, 64, 128):
                for n in POLICY_LENGTHS:
                    for part in kr.POLICY_KERNELS:
                        stats, _ = kr.policy_attention_stats(arch, dt, d, n, part)
                        rows.append(dict(stats.row(), models=f"head dim {d}", dtype=_dtype_name(dt)))
    return rows


# (model, C, H, rows M of S): DeiT-S at its first selector (196 spatial rows), and the widest head dim the Triton
# backend takes (d = 128, where the backward leaves dW_in to a GEMM). The kernels compile per (C, H, dtype) and
# M's tile size (16 rows up to M = 16, else 32): one shape stands for every stage.
SELECTOR_TRAIN_SHAPES = [("DeiT-S", 384, 6, 196), ("head dim 128", 768, 6, 196)]


def selector_train_rows(dtypes):
    rows = []
    for arch in ARCHS:
        for dt in dtypes:
            for model, C, H, M in SELECTOR_TRAIN_SHAPES:
                for kernel in kr.SELECTOR_TRAIN_KERNELS:
                    stats, _ = kr.selector_train_stats(arch, dt, C, H, M, kernel)
                    rows.append(dict(stats.row(), models=model, dtype=_dtype_name(dt)))
    return rows


# (x, branch, y dtypes): the training block under bf16 autocast, then a 16-bit and a float32 stream.
ADD_LN_DTYPES = [(torch.float32, torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16, torch.float16),
                 (torch.float32, torch.float32, torch.float32)]
ADD_LN_WIDTHS = [("DeiT-T", 192), ("DeiT-S", 384), ("DeiT-B", 768)]


def add_layer_norm_rows(quick):
    rows = []
    for arch in ARCHS:
        for i, dts in enumerate(ADD_LN_DTYPES[:1] if quick else ADD_LN_DTYPES):
            for model, C in ADD_LN_WIDTHS if i == 0 else ADD_LN_WIDTHS[1:2]:
                # the autocast block with stochastic depth's per-row branch scale too (the student's adds)
                for scaled in (False, True) if i == 0 else (False,):
                    for part in kr.ADD_LAYER_NORM_KERNELS:
                        stats, _ = kr.add_layer_norm_stats(arch, *dts, C, part, scaled)
                        rows.append(dict(stats.row(), models=model, dtype=_dtype_name(dts[0])))
    return rows


def gelu_mlp_rows(dtypes):
    rows = []
    for arch in ARCHS:
        for dt in dtypes:
            for part in kr.GELU_MLP_GEMMS:
                stats, _ = kr.gelu_mlp_stats(arch, dt, part)
                rows.append(dict(stats.row(), models="all (any C, F)", dtype=_dtype_name(dt)))
    return rows


def extension_rows(so_path):
    if so_path is None:
        from spvit_kernels._ext import _C, build_info

        if not build_info()["with_cuda"]:
            print("the extension was built without CUDA: no prune_pack rows (pass --so)")
            return []
        so_path = _C.__file__
    return [dict(s.row(), models="all", dtype="") for s in kr.extension_stats(so_path)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--so", help="the compiled extension to read (default: the imported one)")
    parser.add_argument("--quick", action="store_true", help="bfloat16 only")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    rows = (token_scores_rows(dtypes) + varlen_rows(dtypes) + policy_rows(dtypes) + selector_train_rows(dtypes)
            + add_layer_norm_rows(args.quick) + gelu_mlp_rows(dtypes) + extension_rows(args.so))
    for r in rows:
        print(f"{r['kernel']:<28} sm_{r['arch']} {r['config'][:70]:<70} regs {r['registers']:>3} "
              f"spill {r['spill_bytes']:>3} smem {r['shared_bytes']:>6} occ {r['occupancy']:.2f} "
              f"sass {r['sass_total']:>5} loop {r['sass_loop']:>5} ld {r['widest_load_bits']:>3} mma {r['mma']}")
    import triton

    common.write_csv("kernel_report", "cpu", rows, label=LABEL,
                     extra_meta={"what": "offline compile (no GPU ran): Triton " + triton.__version__
                                 + " with its bundled ptxas; SASS read with nvdisasm / cuobjdump",
                                 "extension": args.so or "imported spvit_kernels._C"})


if __name__ == "__main__":
    main()
