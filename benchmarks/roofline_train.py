"""MODELED (not measured) GPU time of one SPViT-DeiT training step (bf16 autocast): paper form vs fused attention.

    python benchmarks/roofline_train.py [--gemm-efficiency 0.7] [--attention-efficiency 0.35] [--batch 256]

No GPU ran any of this. One optimiser step of the paper's recipe on DeiT-T/S/B at 224 px (197 tokens in every
block: the training form keeps the whole tensor), counted op by op as bytes that must move and FLOPs:
  * GEMMs of the student (forward + backward = 3x the forward FLOPs), of the teacher (forward only), patch
    embedding and head: FLOPs / (tensor peak x --gemm-efficiency), the same for both forms.
  * LayerNorms, GELU, residual adds: bytes (forward as the inference model, backward twice that), the same for
    both forms; the AdamW update: 16 bytes read and 12 written per parameter (fp32 weights, grads, moments).
  * Attention, where the forms differ:
      paper form (vit_l2_3keep_senet.py: scores materialised, the eye-matrix policy, fp32 softmax): its batched
      matmuls as GEMMs, plus every elementwise pass over the B x H x N x N scores as written, forward (PASSES_FWD)
      and the autograd passes of its backward (PASSES_BWD), each at its dtype's bytes per element;
      fused form (torch.ops.spvit.policy_attention, FlashAttention style): q, k, v, policy in, out and the
      row statistics out (forward); q, k, v, out, dout, statistics in, dq, dk, dv, dpolicy out (backward);
      the tensor FLOPs (forward 4 N^2 d per head, backward 10 N^2 d: the scores recomputed) at
      --attention-efficiency of the tensor peak (an assumption: FlashAttention-2 kernels reach roughly 35-70%
      at d = 64; the kernel report shows no spills and tensor-core MMA for these kernels, not their speed).
  * The selectors' training forms and the loss are left out (the same order of work in both forms, small).
Memory: the attention tensors autograd keeps for backward, per step (paper form: the scores after each op that
its backward needs; fused: out and the row statistics), O(N^2) against O(N).

Peak figures as in roofline.py (datasheets). Writes benchmarks/results/roofline_train-MODELED.csv.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from roofline import GPUS, MODELS  # noqa: E402

N = 197
DEPTH = 12
PATCHES = 196
BF16, FP32 = 2, 4

# The paper form's passes over the scores, (what, bytes per score element): reads + writes as PyTorch runs them
# under bf16 autocast (matmul outputs bf16, the softmax cast to fp32 and back).
PASSES_FWD = [
    ("q @ k^T (write)", BF16), ("* scale", 2 * BF16), ("row max (read)", BF16), ("- max", 2 * BF16),
    ("to float32", BF16 + FP32), ("exp_", 2 * FP32), ("* policy", 2 * FP32), ("+ eps / N", 2 * FP32),
    ("row sum (read)", FP32), ("/ (sum + eps)", 2 * FP32), ("type_as bf16", FP32 + BF16), ("@ v (read)", BF16),
]
PASSES_BWD = [
    ("@ v: d scores (write) and dv (read)", 2 * BF16), ("type_as", BF16 + FP32),
    ("division: d numerator and d denominator", 4 * FP32), ("row sum: expand and accumulate", 2 * FP32),
    ("* policy: d exp and d policy", 4 * FP32), ("exp: grad x result", 3 * FP32), ("to float32", FP32 + BF16),
    ("max: zeros + scatter, accumulate", 4 * BF16), ("* scale", 2 * BF16),
    ("q @ k^T: dq and dk (read twice)", 2 * BF16),
]
# Kept for backward by autograd (bytes per score element): scaled scores, exp result, policy product, the
# numerator of the division, the bf16 probabilities @ v reads.
SAVED = [("scaled scores", BF16), ("exp", FP32), ("* policy", FP32), ("+ eps / N", FP32), ("probabilities", BF16)]
EYE_POLICY = 3 * FP32  # attn_policy = policy + (1 - policy) * eye: a (B, 1, N, N) fp32 tensor written, read


def step_rows(gpu, model, C, H, B, gemm_eff, attn_eff):
    d = C // H
    T = B * N
    E = B * H * N * N  # score elements per block
    params = DEPTH * 12 * C * C + 768 * C + 1000 * C  # weights of the blocks, patch embedding and head
    rows = []

    def row(form, op, seconds, *, gflop=0.0, gbytes=0.0, saved_gb=0.0, bound=""):
        rows.append(dict(gpu=gpu.name, model=model, form=form, op=op, gflop=round(gflop, 2),
                         gbytes=round(gbytes, 3), modeled_ms=round(seconds * 1e3, 3), bound=bound,
                         saved_for_backward_gb=round(saved_gb, 3)))

    gemm = 24 * T * C * C * DEPTH + 2 * B * PATCHES * 768 * C + 2 * B * C * 1000
    for form in ("paper", "fused"):
        row(form, "GEMMs student (forward + backward)", 3 * gemm / (gpu.tensor_flops * gemm_eff), gflop=3 * gemm / 1e9,
            bound=f"tensor x {gemm_eff}")
        row(form, "GEMMs teacher (forward)", gemm / (gpu.tensor_flops * gemm_eff), gflop=gemm / 1e9,
            bound=f"tensor x {gemm_eff}")
        eltwise = BF16 * T * C * (4 + 16 + 6 + 6) * DEPTH  # LN x2, GELU, residual adds, one forward
        row(form, "LayerNorms, GELU, residual adds (student 3x, teacher 1x)", 4 * eltwise / gpu.bandwidth,
            gbytes=4 * eltwise / 1e9, bound="bytes")
        row(form, "AdamW update", 28 * params / gpu.bandwidth, gbytes=28 * params / 1e9, bound="bytes")
        # the teacher's attention: timm's fused SDPA (forward only), the same in both forms
        t_flops = 4 * B * H * N * N * d * DEPTH
        t_bytes = 4 * T * C * BF16 * DEPTH
        row(form, "attention teacher (SDPA forward)", max(t_flops / (gpu.tensor_flops * attn_eff),
                                                           t_bytes / gpu.bandwidth), gflop=t_flops / 1e9,
            gbytes=t_bytes / 1e9, bound=f"tensor x {attn_eff}")
    # student attention, paper form
    mm = 4 * B * H * N * N * d * DEPTH  # q k^T and p v, forward
    row("paper", "attention student: batched matmuls (forward + backward)", 3 * mm / (gpu.tensor_flops * gemm_eff),
        gflop=3 * mm / 1e9, bound=f"tensor x {gemm_eff}")
    per_elem = sum(b for _, b in PASSES_FWD) + sum(b for _, b in PASSES_BWD) + EYE_POLICY / H
    paper_bytes = per_elem * E * DEPTH
    saved = sum(b for _, b in SAVED) * E * DEPTH
    row("paper", f"attention student: {len(PASSES_FWD)} + {len(PASSES_BWD)} passes over B H N^2 scores "
        f"({per_elem:.1f} bytes per element)", paper_bytes / gpu.bandwidth, gbytes=paper_bytes / 1e9,
        saved_gb=saved / 1e9, bound="bytes")
    # student attention, fused form
    f_flops = (4 + 10) * B * H * N * N * d * DEPTH
    f_bytes = (BF16 * T * C * (3 + 1 + 5 + 3) + FP32 * B * N * 2 + FP32 * B * H * N * 2) * DEPTH
    f_saved = (BF16 * T * C + FP32 * B * H * N) * DEPTH  # out and the row statistics (q, k, v are GEMM outputs)
    t = max(f_flops / (gpu.tensor_flops * attn_eff), f_bytes / gpu.bandwidth)
    row("fused", "attention student: policy_attention forward + backward", t, gflop=f_flops / 1e9,
        gbytes=f_bytes / 1e9, saved_gb=f_saved / 1e9, bound=f"tensor x {attn_eff}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gemm-efficiency", type=float, default=0.7, help="fraction of the tensor peak of the GEMMs")
    p.add_argument("--attention-efficiency", type=float, default=0.35,
                   help="fraction of the tensor peak of the fused attention kernels (an assumption)")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    rows, lines = [], ["| GPU | model | paper form ms | fused ms | speed-up | attention saved for backward, paper / "
                       "fused GB |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for gpu in GPUS:
        for model, C, H in MODELS:
            r = step_rows(gpu, model, C, H, args.batch, args.gemm_efficiency, args.attention_efficiency)
            tot = {f: sum(x["modeled_ms"] for x in r if x["form"] == f) for f in ("paper", "fused")}
            saved = {f: sum(x["saved_for_backward_gb"] for x in r if x["form"] == f) for f in ("paper", "fused")}
            rows += r + [dict(gpu=gpu.name, model=model, form=f, op="TOTAL", modeled_ms=round(tot[f], 3),
                              bound=f"{args.batch / (tot[f] * 1e-3):.0f} images/s",
                              saved_for_backward_gb=round(saved[f], 3)) for f in ("paper", "fused")]
            lines.append(f"| {gpu.name} | {model} | {tot['paper']:.1f} | {tot['fused']:.1f} | "
                         f"{tot['paper'] / tot['fused']:.2f}x | {saved['paper']:.2f} / {saved['fused']:.3f} |")
    common.write_csv("roofline_train", "cpu", rows, label="MODELED", extra_meta={
        "what": "MODELED, not measured: bytes and FLOPs of one training step on datasheet peaks",
        "batch": args.batch, "dtype": "bfloat16 autocast", "gemm_efficiency": args.gemm_efficiency,
        "attention_efficiency": args.attention_efficiency})
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
