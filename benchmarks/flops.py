"""FLOPs of one model forward: the FLOP ceiling that end-to-end speedups are read against.

`forward_gflops(fn)` runs `fn()` once under torch's FlopCounterMode and returns the FLOPs it counted (a
multiply-add = 2 FLOPs), in GFLOP. FlopCounterMode knows torch's matmuls and convolutions; the formulas below
add what it does not count:
  scaled_dot_product_attention        4 * B * H * Lq * Lk * d (QK^T and PV; a mask saves nothing, which is
                                      why the masked reference model costs as much as the dense one)
  spvit::varlen_attention             4 * sum over images of n_b^2 * H * d (only the tokens each image keeps)
  spvit::token_scores                 per scored row and head: the d->d, d->d/2, d/2->d/4, d/4->2 linears;
                                      per row: the SE branch H->H/2->H
  spvit::prune_pack                   2 * C per row not copied (dropped, and so pooled; with package
                                      "add" also the old package row): the weighted package sum
Element-wise work (LayerNorm, GELU, softmax, residual adds) is left out on both sides, as FLOP counts
of ViTs usually do, so the ratio dense / pruned is the speedup that the matmul work alone would give.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import spvit_kernels  # noqa: F401  (registers torch.ops.spvit.*)

_registered = False


def _register_formulas():
    global _registered
    if _registered:
        return
    _registered = True

    # FlopCounterMode first decomposes composite ops: on a CPU, SDPA becomes the fused CPU kernel below.
    sdpa_ops = [torch.ops.aten.scaled_dot_product_attention]
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        sdpa_ops.append(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)

    @register_flop_formula(sdpa_ops, get_raw=True)
    def _sdpa(q, k, v, *args, out_val=None, **kwargs):
        *batch, Lq, d = q.shape
        return 4 * int(torch.tensor(batch).prod()) * Lq * k.shape[-2] * d

    @register_flop_formula(torch.ops.spvit.varlen_attention, get_raw=True)
    def _varlen(q, k, v, cu_seqlens, *args, out_val=None, **kwargs):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
        return 4 * int((lengths * lengths).sum()) * q.shape[1] * q.shape[2]

    @register_flop_formula(torch.ops.spvit.token_scores, get_raw=True)
    def _token_scores(x, cu_seqlens, num_packages, num_heads, *args, out_val=None, **kwargs):
        T, C = x.shape
        d = C // num_heads
        per_head = 2 * (d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2)
        se = 2 * 2 * num_heads * (num_heads // 2)
        return T * (num_heads * per_head + se)

    @register_flop_formula(torch.ops.spvit.prune_pack, get_raw=True)
    def _prune_pack(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold=0.0, num_keep=None,
                    package="mean", *args, out_val=None, **kwargs):
        if package == "none":
            return 0
        copied = int((out_val[2] >= 0).sum())  # src_index: the input row of every copied output row
        return 2 * (x.shape[0] - copied) * x.shape[1]  # every row not copied is pooled


def forward_gflops(fn, *modules):
    """GFLOPs of one call of `fn()` (see the module docstring for what is counted). `modules`: the models
    `fn` runs; their parameters stop requiring grad during the count (FlopCounterMode's module tracking puts
    grad hooks on module inputs that require grad, which fails on views of parameters made without autograd,
    e.g. timm PiT's expanded class token), and are restored after it."""
    _register_formulas()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter.get_total_flops() / 1e9
