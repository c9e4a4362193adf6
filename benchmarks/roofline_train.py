"""MODELED (not measured) GPU time of one SPViT-DeiT training step (bf16 autocast): paper form vs fused attention.

    python benchmarks/roofline_train.py [--gemm-efficiency 0.7] [--attention-efficiency 0.35] [--batch 256]

No GPU ran any of this. One optimiser step of the paper's recipe on DeiT-T/S/B at 224 px (197 tokens in every
block: the training form keeps the whole tensor), counted op by op as bytes that must move and FLOPs:
  * GEMMs of the student (forward + backward = 3x the forward FLOPs), of the teacher (forward only), patch
    embedding and head: FLOPs / (tensor peak x --gemm-efficiency), the same for both forms.
  * LayerNorms, casts, GELU, residual adds: the bytes each pass reads and writes per token and channel of a
    block (EAGER_FWD / EAGER_BWD: PyTorch eager under bf16 autocast, the residual stream float32, GEMM outputs
    bf16, LayerNorm in float32 and its output cast for the next GEMM); the fused form runs each residual add
    and the LayerNorm reading it as one torch.ops.spvit.add_layer_norm pass (FUSED_FWD / FUSED_BWD), in the
    student's blocks and in the teacher's, GELU in the epilogues of the MLP's GEMMs (torch.ops.spvit.gelu_mlp:
    fc1 writes u and gelu(u), fc2's input gradient multiplies by gelu'(u); its Triton GEMMs assumed as fast as
    cuBLAS's for their main loops; their epilogues, which evaluate GELU per element, are a separate row: the
    kernel report's straight-line SASS of each kernel, once per tile and thread, on the issue slots or the MUFU,
    not overlapped with the tensor cores: the TOTAL; "TOTAL, GEMM epilogues hidden" drops that row, as when
    another resident block's main loop covers each epilogue; the teacher's fc1 is the kernel that writes gelu(u)
    alone), and its attention output needs no transpose copy; fc1's bias gradient comes from that epilogue, the
    others stay PyTorch reductions. The AdamW update: 16 bytes read and 12 written per parameter. Stochastic depth
    (the recipe's --drop-path 0.1 scales the student's branches per image): a pass of its own per branch in the
    paper form (DROP_PATH), folded into add_layer_norm's pass in the fused form but for each segment's last MLP
    branch, which is added outside a norm (DROP_PATH_SEGMENT_END).
  * Attention, where the forms differ:
      paper form (vit_l2_3keep_senet.py: q, k, v cast to float32, scores materialised, the eye-matrix policy, fp32
      softmax): its batched matmuls as GEMMs, plus every elementwise pass over the B x H x N x N scores as
      written, forward (PASSES_FWD) and the autograd passes of its backward (PASSES_BWD), each at its dtype's
      bytes per element, and the casts of q, k, v up and back down (QKV_CASTS, forward and backward); its teacher
      (VisionTransformerTeacher: the same Attention without a policy) the same way, forward only
      (TEACHER_PASSES, its matmuls, the casts);
      fused form (torch.ops.spvit.policy_attention, FlashAttention style): q, k, v, policy in, out and the
      row statistics out (forward); q, k, v, out, dout, statistics in, dq, dk, dv, dpolicy out (backward);
      the tensor FLOPs (forward 4 N^2 d per head, backward 10 N^2 d: the scores recomputed) at
      --attention-efficiency of the tensor peak (an assumption: FlashAttention-2 kernels reach roughly 35-70%
      at d = 64; the kernel report shows no spills and tensor-core MMA for these kernels, not their speed); its
      teacher timm's attention through SDPA at the same efficiency.
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
from roofline import GPUS, MODELS, REPORT, _config, read_report  # noqa: E402

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
# The paper code's teacher (VisionTransformerTeacher) runs the same Attention without a policy: its passes over the
# scores under bf16 autocast (softmax is one of autocast's float32 ops: its input cast up, its output float32, cast
# down again for `@ v`).
TEACHER_PASSES = [("q @ k^T (write)", BF16), ("* scale", 2 * BF16),
                  ("softmax: autocast's cast to float32", BF16 + FP32), ("softmax", 2 * FP32),
                  ("@ v: autocast's cast to bf16", FP32 + BF16), ("@ v (read)", BF16)]
# The paper code's Attention casts q, k and v to float32 (`qkv[0].float()`), and under autocast its matmuls cast
# them back to bf16: per token and channel of each, 2 + 4 bytes up and 4 + 2 down, forward; backward the two
# casts' gradients, the same again. Student and teacher alike (neither exists in the fused form).
QKV_CASTS = 3 * 2 * (BF16 + FP32)

# Element-wise passes of one timm block per token and channel (bytes read + written) under bf16 autocast: the
# residual stream float32 (the position embedding is), GEMM outputs bf16, LayerNorm in float32. PyTorch eager:
EAGER_FWD = [("norm1: LayerNorm, float32 in and out", 8), ("norm1: cast to bf16 for the qkv GEMM", 6),
             ("attention output: transpose copy to (B, N, C)", 4), ("residual add 1: float32 + bf16", 10),
             ("norm2: LayerNorm", 8), ("norm2: cast", 6), ("GELU on the bf16 fc1 output (4C)", 16),
             ("residual add 2", 10)]
EAGER_BWD = [("add 2: the branch's gradient cast to bf16", 6), ("fc2 bias gradient (a read)", 2),
             ("GELU backward: gradient and input in, gradient out (4C)", 24), ("fc1 bias gradient", 8),
             ("norm2: the cast's backward", 6), ("norm2: LayerNorm backward, input then weight gradients", 20),
             ("residual gradient accumulated", 12), ("add 1: the branch's gradient cast", 6),
             ("proj bias gradient", 2), ("attention output: transpose backward", 4), ("norm1: the cast's backward", 6),
             ("norm1: LayerNorm backward", 20), ("residual gradient accumulated", 12)]
# Stochastic depth (the recipe's --drop-path 0.1): timm's DropPath scales each of a student block's two branches per
# image, one bf16 pass each (read and write: 4), forward and backward alike (the teacher is in eval mode, where it
# does nothing).
DROP_PATH = 2 * 4 + 2 * 4
# The fused form multiplies by the mask inside add_layer_norm's pass (forward: the branch; backward: its gradient; a
# float32 factor per row, nothing per channel); each segment's last MLP branch, added to the stream outside a norm,
# keeps its multiply, forward and backward.
DROP_PATH_SEGMENT_END = 4 + 4
# The fused form: each `x = x + branch; h = norm(x)` one add_layer_norm pass (read x float32 and the bf16
# branch, write s float32 and h bf16: 12); backward one pass (read dy bf16, dsum and s float32, write dx float32
# and dbranch bf16: 16). policy_attention writes (B, N, H, d): no transpose copy in the student. The GEMMs of
# gelu_mlp (Triton) are assumed to reach the GEMM efficiency of cuBLAS's (not measured).
# gelu_mlp: fc1's epilogue writes gelu(u) besides u (8: the GELU pass's read of u and its second read are gone),
# fc2's input-gradient epilogue reads u (8: the GELU-backward pass and the write of dg are gone) and sums du's
# columns (fc1's bias gradient: the 8-byte read of du is gone).
FUSED_FWD = [("add_layer_norm x 2", 24), ("gelu_mlp: gelu(u) written by fc1's epilogue (4C)", 8)]
FUSED_BWD = [("add_layer_norm backward x 2", 32), ("gelu_mlp: u read by the input gradient's epilogue (4C)", 8),
             ("bias gradients: fc2, proj (fc1's: column sums in that epilogue)", 4)]
# The teacher (no_grad): fc1's epilogue writes gelu(u) instead of u, nothing more. Its timm attention needs no
# transpose copy: PyTorch's fused SDPA kernels (flash, memory-efficient, cuDNN) write their output (B, N, H, d)-major
# and return it as a (B, H, N, d) view, so timm's transpose(1, 2).reshape(B, N, C) is a view again.
FUSED_TEACHER = FUSED_FWD[:1]
# The training forward fuses across the blocks of a segment (between two selectors): each of DeiT's 4 segments
# ends with a plain add (10 bytes; its backward a cast, 6) and starts with a norm without a branch (6 instead of
# 12; backward: dx and the residual gradient accumulated, 10 + 12 instead of 16).
SEGMENTS = 4
SEGMENT_FWD, SEGMENT_BWD = 10 - 6, 6 + (10 + 12 - 16)


def epilogue_time(gpu, report, part, M, N):
    """Seconds of gelu_mlp's `part` GEMM epilogue (GELU or its derivative per output element, the stores) on an
    (M, N) output, from the kernel report's bf16 row for the GPU's arch: the kernel's straight-line instructions
    (all but the K loop), run once per tile by every thread, on the issue slots or the MUFU lanes, whichever binds,
    and not overlapped with the tensor cores (the upper bound; with two or more blocks per SM another block's main
    loop can hide it)."""
    row = next(r for r in report if r["kernel"] == f"gelu_mlp_{part}" and int(r["arch"]) == gpu.arch
               and r["dtype"] == "bfloat16")
    cfg = _config(row)
    tiles = -(-M // int(cfg["BLOCK_M"])) * -(-N // int(cfg["BLOCK_N"]))
    lanes = 32 * int(row["num_warps"]) * tiles
    per_sm = gpu.sms * gpu.clock
    return max((int(row["sass_total"]) - int(row["sass_loop"])) * lanes / (per_sm * gpu.issue),
               int(row["mufu"]) * lanes / (per_sm * gpu.mufu_lanes))


def step_rows(gpu, model, C, H, B, gemm_eff, attn_eff, report):
    """The rows of one (GPU, model) step; report: the kernel report's rows (read_report)."""
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
        if form == "paper":
            parts = [("student forward", EAGER_FWD, 0), ("student backward", EAGER_BWD, 0),
                     ("teacher forward", EAGER_FWD, 0)]
        else:
            parts = [("student forward", FUSED_FWD, SEGMENT_FWD * SEGMENTS),
                     ("student backward", FUSED_BWD, SEGMENT_BWD * SEGMENTS), ("teacher forward", FUSED_TEACHER, 0)]
        for what, passes, per_model in parts:
            per_block = sum(b for _, b in passes)
            nbytes = T * C * (per_block * DEPTH + per_model)
            row(form, f"{what}: LayerNorms, casts, GELU, residual adds ({per_block} bytes per token and channel "
                f"per block)", nbytes / gpu.bandwidth, gbytes=nbytes / 1e9, bound="bytes")
        row(form, "AdamW update", 28 * params / gpu.bandwidth, gbytes=28 * params / 1e9, bound="bytes")
        if form == "paper":
            dp_bytes, what = DROP_PATH * T * C * DEPTH, f"{DROP_PATH} bytes per token and channel per block"
        else:
            dp_bytes = DROP_PATH_SEGMENT_END * T * C * SEGMENTS
            what = f"in add_layer_norm's pass; {DROP_PATH_SEGMENT_END} bytes per token and channel per segment end"
        row(form, f"drop path (student, forward and backward: {what})", dp_bytes / gpu.bandwidth,
            gbytes=dp_bytes / 1e9, bound="bytes")
    # the teacher's attention: fused, timm's SDPA (forward only); the paper code's teacher materialises its scores
    t_flops = 4 * B * H * N * N * d * DEPTH
    t_bytes = 4 * T * C * BF16 * DEPTH
    row("fused", "attention teacher (SDPA forward)", max(t_flops / (gpu.tensor_flops * attn_eff),
                                                          t_bytes / gpu.bandwidth), gflop=t_flops / 1e9,
        gbytes=t_bytes / 1e9, bound=f"tensor x {attn_eff}")
    row("paper", "attention teacher: batched matmuls (forward)", t_flops / (gpu.tensor_flops * gemm_eff),
        gflop=t_flops / 1e9, bound=f"tensor x {gemm_eff}")
    per_elem_t = sum(b for _, b in TEACHER_PASSES)
    teacher_bytes = per_elem_t * E * DEPTH
    row("paper", f"attention teacher: {len(TEACHER_PASSES)} passes over B H N^2 scores ({per_elem_t} bytes per "
        f"element)", teacher_bytes / gpu.bandwidth, gbytes=teacher_bytes / 1e9, bound="bytes")
    cast_bytes = QKV_CASTS * T * C * DEPTH
    row("paper", f"attention teacher: q, k, v cast to float32 and back ({QKV_CASTS} bytes per token and channel per "
        "block)", cast_bytes / gpu.bandwidth, gbytes=cast_bytes / 1e9, bound="bytes")
    row("paper", f"attention student: q, k, v cast to float32 and back, forward and backward ({QKV_CASTS} + "
        f"{QKV_CASTS} bytes per token and channel per block)", 2 * cast_bytes / gpu.bandwidth,
        gbytes=2 * cast_bytes / 1e9, bound="bytes")
    # gelu_mlp's epilogues: fc1 (GELU on u) in the student's forward and, writing gelu(u) alone, the teacher's;
    # fc2's input gradient (GELU's derivative on du) in the student's backward
    t_epi = DEPTH * (epilogue_time(gpu, report, "fc1", T, 4 * C) + epilogue_time(gpu, report, "fc1_nograd", T, 4 * C)
                     + epilogue_time(gpu, report, "fc2_dgrad", T, 4 * C))
    row("fused", "gelu_mlp GEMM epilogues: GELU on u and du (issue slots, not overlapped with the MMA)", t_epi,
        bound="issue (kernel report)")
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
    rows, lines = [], ["| GPU | model | paper form ms | fused ms | speed-up | speed-up, paper teacher through SDPA "
                       "| attention saved for backward, paper / fused GB |",
                       "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    epilogue_op = "gelu_mlp GEMM epilogues"
    report, rmeta = read_report(REPORT)
    for gpu in GPUS:
        for model, C, H in MODELS:
            r = step_rows(gpu, model, C, H, args.batch, args.gemm_efficiency, args.attention_efficiency, report)
            tot = {f: sum(x["modeled_ms"] for x in r if x["form"] == f) for f in ("paper", "fused")}
            saved = {f: sum(x["saved_for_backward_gb"] for x in r if x["form"] == f) for f in ("paper", "fused")}
            rows += r + [dict(gpu=gpu.name, model=model, form=f, op="TOTAL", modeled_ms=round(tot[f], 3),
                              bound=f"{args.batch / (tot[f] * 1e-3):.0f} images/s",
                              saved_for_backward_gb=round(saved[f], 3)) for f in ("paper", "fused")]
            # the fused form's range: its GEMM epilogues not overlapped (the TOTAL) or hidden behind another
            # resident block's main loop (the kernel report gives each GEMM two or more blocks per SM)
            # the paper form had its teacher called timm's attention (SDPA), as the fused form's does
            sdpa_teacher = (tot["paper"] - sum(x["modeled_ms"] for x in r if x["form"] == "paper"
                                               and x["op"].startswith("attention teacher"))
                            + sum(x["modeled_ms"] for x in r if x["form"] == "fused"
                                  and x["op"].startswith("attention teacher")))
            rows.append(dict(gpu=gpu.name, model=model, form="paper", op="TOTAL, teacher through timm's SDPA",
                             modeled_ms=round(sdpa_teacher, 3),
                             bound=f"{args.batch / (sdpa_teacher * 1e-3):.0f} images/s",
                             saved_for_backward_gb=round(saved["paper"], 3)))
            hidden = tot["fused"] - sum(x["modeled_ms"] for x in r if x["op"].startswith(epilogue_op))
            rows.append(dict(gpu=gpu.name, model=model, form="fused", op="TOTAL, GEMM epilogues hidden",
                             modeled_ms=round(hidden, 3), bound=f"{args.batch / (hidden * 1e-3):.0f} images/s",
                             saved_for_backward_gb=round(saved["fused"], 3)))
            lines.append(f"| {gpu.name} | {model} | {tot['paper']:.1f} | {hidden:.1f}-{tot['fused']:.1f} | "
                         f"{tot['paper'] / tot['fused']:.2f}-{tot['paper'] / hidden:.2f}x | "
                         f"{sdpa_teacher / tot['fused']:.2f}-{sdpa_teacher / hidden:.2f}x | "
                         f"{saved['paper']:.2f} / {saved['fused']:.3f} |")
    common.write_csv("roofline_train", "cpu", rows, label="MODELED", extra_meta={
        "kernel_report_commit": rmeta.get("commit", "unknown"),
        "what": "MODELED, not measured: bytes and FLOPs of one training step on datasheet peaks",
        "batch": args.batch, "dtype": "bfloat16 autocast", "gemm_efficiency": args.gemm_efficiency,
        "attention_efficiency": args.attention_efficiency})
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
