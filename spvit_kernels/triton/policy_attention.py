"""Triton forward and backward of SPViT's training attention with a keep policy (FlashAttention style).

    out, row_max, denom = policy_attention_fwd_triton(q, k, v, policy, eps, softmax_scale)
    dq, dk, dv, dpolicy = policy_attention_bwd_triton(dout, q, k, v, policy, out, row_max, denom, eps, softmax_scale)

    q, k, v:   (B, N, H, d) float32 / float16 / bfloat16, last dim contiguous, any other strides (views of one
               packed (B, N, 3, H, d) qkv projection are read in place).
    policy:    (B, N) float32 (1 = a key every row may read; values in between allowed).
    out:       (B, N, H, d) contiguous, q's dtype.
    row_max:   (B, H, N) float32, m_i = max_j s_ij in log2 units (s scaled by softmax_scale * log2 e).
    denom:     (B, H, N) float32, D_i = sum_j 2^(s_ij - m_i) p~_ij + eps.

The formula (spvit_kernels/training/policy_attention.py): A_ij = (E_ij p~_ij + eps/N) / D_i, E_ij = exp(s_ij -
m_i) with the row max over all keys, p~_ij = p_j + (1 - p_j)[i = j]. The eps term's contribution to out is
(eps/N) (sum_j v_j) / D_i: the forward streams sum_j v_j with the keys, so no N x N value is ever stored.

Forward: one program per (query tile, image, head) streams the keys in tiles, keeping the running max (over all
keys, alive or not), the running weighted denominator and the output in float32 (online softmax, exp2).
Backward: the row max is treated as a constant (it moves results only through the eps terms). With
G_ij = (dA_ij - delta_i) E_ij / D_i, dA = dout v^T, delta_i = dout_i . out_i, ds_ij = G_ij p~_ij:
    dk, dv, and the policy's per-head column sums sum_{i != j} G_ij: one program per key tile (loops over queries)
    dq: one program per query tile (loops over keys)
Both recompute the scores from q, k and the saved (row_max, denom): memory O(N) per row, never N x N.
dv's eps part (eps/N) sum_i dout_i / D_i and delta are O(N d) reductions done in PyTorch around the kernels.

Precision: as varlen_attention: 16-bit inputs use tensor-core dots with float32 accumulation, the weights rounded
to the input dtype for the second dot; float32 follows torch.backends.cuda.matmul.allow_tf32 (IEEE by default).
Under TRITON_INTERPRET=1 with bfloat16 the operands are upcast before each dot (UPCAST_DOTS, see
varlen_attention.py for why).
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._triton_support import interpret_mode
from .varlen_attention import _dot_precision

_LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class PolicyConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


def default_config(seqlen, head_dim, dtype, backward):
    """Tiles for the forward / backward kernels, each chosen so that ptxas keeps everything in registers on
    sm_80 and sm_90 (the kernel report and tests/test_kernel_report.py hold them to no spills):
    - <= 16 tokens: 16 x 16 tiles, 2 warps (4 for float32, which spills up to 908 bytes with 2);
    - float32 (IEEE dots on the CUDA cores, operands in registers): 32 x 32 tiles with 4 warps; head dims above
      64 take 32 x 16 with 8 warps (32 x 32 spills on sm_90: 388-4,420 bytes);
    - 16-bit: 64 x 64 forward tiles (8 warps above head dim 64); the backward holds two (BLOCK_N, d) float32
      accumulators: 32 x 64 with 8 warps, 4 for head dims up to 32 (8 warps spill 8 bytes on sm_90 there)."""
    wide = triton.next_power_of_2(head_dim) > 64
    if seqlen <= 16:
        return PolicyConfig(16, 16, 4 if dtype == torch.float32 else 2, 1)
    if dtype == torch.float32:
        if wide:
            return PolicyConfig(32, 16, 8, 1)
        return PolicyConfig(32, 32, 4, 1 if backward else 2)
    if backward:
        return PolicyConfig(32, 64, 4 if head_dim <= 32 else 8, 1)
    return PolicyConfig(64, 64, 8 if wide else 4, 2)


@triton.jit
def _scores(q, kt, qk_scale_log2, UPCAST_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if UPCAST_DOTS:
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    return s * qk_scale_log2


@triton.jit
def _dot(a, b, UPCAST_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _policy_attention_fwd_kernel(
    Q, K, V, POL, O, ROW_MAX, DENOM,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh, stride_pb,
    seqlen, num_heads, qk_scale_log2, eps, eps_over_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_img = K + b * stride_kb + h * stride_kh
    v_img = V + b * stride_vb + h * stride_vh
    pol_img = POL + b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    vsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < seqlen
        kt = tl.load(k_img + cols[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None],
                     other=0.0)
        v = tl.load(v_img + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        pol = tl.load(pol_img + cols, mask=col_ok, other=0.0)
        s = tl.where(col_ok[None, :], _scores(q, kt, qk_scale_log2, UPCAST_DOTS, DOT_PRECISION), float("-inf"))
        # The max runs over every key, alive or not (as the paper code's softmax_with_policy); each tile holds
        # a valid key, so it stays finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        ptil = tl.where(offs_m[:, None] == cols[None, :], 1.0, pol[None, :])
        w = tl.math.exp2(s - m_new[:, None]) * ptil
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + _dot(w.to(v.dtype), v, UPCAST_DOTS, DOT_PRECISION)
        vsum += tl.sum(v.to(tl.float32), 0)
        m_i = m_new
    denom = l_i + eps
    out = (acc + eps_over_n * vsum[None, :]) / denom[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    stat = bh.to(tl.int64) * seqlen + offs_m
    tl.store(ROW_MAX + stat, m_i, mask=row_ok)
    tl.store(DENOM + stat, denom, mask=row_ok)


@triton.jit
def _policy_attention_bwd_kv_kernel(
    Q, K, V, POL, DO, ROW_MAX, DENOM, DELTA, DK, DV, DPOL,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh, stride_pb,
    seqlen, num_heads, qk_scale_log2, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    # One key tile of one (image, head): dk, dv and the policy's column sums, looping over the query tiles.
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < seqlen
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    pol = tl.load(POL + b * stride_pb + cols, mask=col_ok, other=0.0)
    q_img = Q + b * stride_qb + h * stride_qh
    do_img = DO + b * stride_dob + h * stride_doh
    stat_img = bh.to(tl.int64) * seqlen

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dpol = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < seqlen
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_img + rows[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_img + rows[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
        m_i = tl.load(ROW_MAX + stat_img + rows, mask=row_ok, other=0.0)
        d_i = tl.load(DENOM + stat_img + rows, mask=row_ok, other=1.0)
        delta = tl.load(DELTA + stat_img + rows, mask=row_ok, other=0.0)
        s = _scores(q, tl.trans(k), qk_scale_log2, UPCAST_DOTS, DOT_PRECISION)     # (BLOCK_M, BLOCK_N)
        ok = row_ok[:, None] & col_ok[None, :]
        ed = tl.where(ok, tl.math.exp2(s - m_i[:, None]), 0.0) / d_i[:, None]     # E / D
        diag = rows[:, None] == cols[None, :]
        ptil = tl.where(diag, 1.0, pol[None, :])
        aw = ed * ptil                                                             # A without its eps term
        dv += _dot(tl.trans(aw).to(do.dtype), do, UPCAST_DOTS, DOT_PRECISION)
        da = _dot(do, tl.trans(v), UPCAST_DOTS, DOT_PRECISION)                    # dout v^T
        g = (da - delta[:, None]) * ed
        dpol += tl.sum(tl.where(diag, 0.0, g), 0)
        ds = g * ptil
        dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST_DOTS, DOT_PRECISION)
    # dk, dv: contiguous (B, N, H, d) float32
    out_off = (b * seqlen * num_heads + h) * HEAD_DIM + cols[:, None] * (num_heads * HEAD_DIM) + offs_d[None, :]
    tl.store(DK + out_off, dk * softmax_scale, mask=kv_mask)
    tl.store(DV + out_off, dv, mask=kv_mask)
    tl.store(DPOL + stat_img + cols, dpol, mask=col_ok)


@triton.jit
def _policy_attention_bwd_q_kernel(
    Q, K, V, POL, DO, ROW_MAX, DENOM, DELTA, DQ,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh, stride_pb,
    seqlen, num_heads, qk_scale_log2, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    # One query tile of one (image, head): dq, looping over the key tiles.
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < seqlen
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :], mask=q_mask,
                 other=0.0)
    stat_img = bh.to(tl.int64) * seqlen
    m_i = tl.load(ROW_MAX + stat_img + rows, mask=row_ok, other=0.0)
    d_i = tl.load(DENOM + stat_img + rows, mask=row_ok, other=1.0)
    delta = tl.load(DELTA + stat_img + rows, mask=row_ok, other=0.0)
    k_img = K + b * stride_kb + h * stride_kh
    v_img = V + b * stride_vb + h * stride_vh
    pol_img = POL + b * stride_pb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < seqlen
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_img + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_img + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        pol = tl.load(pol_img + cols, mask=col_ok, other=0.0)
        s = _scores(q, tl.trans(k), qk_scale_log2, UPCAST_DOTS, DOT_PRECISION)
        ok = row_ok[:, None] & col_ok[None, :]
        ed = tl.where(ok, tl.math.exp2(s - m_i[:, None]), 0.0) / d_i[:, None]
        ptil = tl.where(rows[:, None] == cols[None, :], 1.0, pol[None, :])
        da = _dot(do, tl.trans(v), UPCAST_DOTS, DOT_PRECISION)
        ds = (da - delta[:, None]) * ed * ptil
        dq += _dot(ds.to(k.dtype), k, UPCAST_DOTS, DOT_PRECISION)
    out_off = (b * seqlen * num_heads + h) * HEAD_DIM + rows[:, None] * (num_heads * HEAD_DIM) + offs_d[None, :]
    tl.store(DQ + out_off, dq * softmax_scale, mask=q_mask)


def _meta(seqlen, d, dtype, backward):
    cfg = default_config(seqlen, d, dtype, backward)
    constexprs = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                      DOT_PRECISION=_dot_precision(dtype), UPCAST_DOTS=dtype == torch.bfloat16 and interpret_mode())
    return cfg, constexprs


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def policy_attention_fwd_triton(q, k, v, policy, eps, softmax_scale):
    """Backend entry (arguments validated; policy (B, N) float32 contiguous). See the module docstring."""
    B, N, H, d = q.shape
    out = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    denom = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if B * N * H == 0:
        return out, row_max, denom
    cfg, c = _meta(N, d, q.dtype, backward=False)
    grid = (triton.cdiv(N, cfg.BLOCK_M), B * H)
    with _device(q):
        _policy_attention_fwd_kernel[grid](
            q, k, v, policy, out, row_max, denom, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            policy.stride(0), N, H, float(softmax_scale) * _LOG2E, float(eps), float(eps) / N,
            **c, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, row_max, denom


def policy_attention_bwd_triton(dout, q, k, v, policy, out, row_max, denom, eps, softmax_scale):
    """Backend entry: (dq, dk, dv) contiguous (B, N, H, d) in q's dtype and dpolicy (B, N) float32."""
    B, N, H, d = q.shape
    f32 = torch.float32
    # delta_i = dout_i . out_i and dv's eps part: O(N d) reductions, left to PyTorch.
    delta = (dout.to(f32) * out.to(f32)).sum(-1).transpose(1, 2).contiguous()              # (B, H, N)
    dq, dk, dv = (torch.empty((B, N, H, d), dtype=f32, device=q.device) for _ in range(3))
    dpol = torch.empty((B, H, N), dtype=f32, device=q.device)
    if B * N * H > 0:
        args = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), policy.stride(0), N, H,
                float(softmax_scale) * _LOG2E, float(softmax_scale))
        cfg, c = _meta(N, d, q.dtype, backward=True)
        with _device(q):
            _policy_attention_bwd_kv_kernel[(triton.cdiv(N, cfg.BLOCK_N), B * H)](
                q, k, v, policy, dout, row_max, denom, delta, dk, dv, dpol, *args,
                **c, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _policy_attention_bwd_q_kernel[(triton.cdiv(N, cfg.BLOCK_M), B * H)](
                q, k, v, policy, dout, row_max, denom, delta, dq, *args,
                **c, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if eps:
        dv += (eps / N) * (dout.to(f32) / denom.transpose(1, 2)[..., None]).sum(1, keepdim=True)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dpol.sum(1)


__all__ = ["PolicyConfig", "default_config", "policy_attention_bwd_triton", "policy_attention_fwd_triton"]
