"""Triton kernels of torch.ops.spvit.token_scores: the fused SPViT selector (SPEC section 2).

Two launches, no host synchronisation, no atomics:

1. `_head_kernel`, grid (B, H): one program per (image, head). It loops over the image's rows twice with a
   runtime bound read from cu_seqlens (so no max length is needed on the host):
   - pass 1 (rows of S = every row but the num_prefix prefix rows): LayerNorm of the head's d channels,
     u_glob = GELU(xn @ W_in[d/2:]^T + b_in[d/2:]) on tensor cores, summed over the rows in a fixed order.
     Its mean g enters the first score layer as a per-(image, head) bias: W1 @ [local, g] + b1 =
     W1[:, :d/2] @ local + (W1[:, d/2:] @ g + b1), so the concatenation is never built.
   - pass 2 (spatial rows only; the (image, head) slice, ~25 KB for DeiT-S in bf16, was just read, so it
     should come from L2 rather than DRAM): the same LayerNorm, u_loc = GELU(xn @
     W_in[:d/2]^T + b_in[:d/2]), two GELU layers (tensor cores) and the keep-minus-drop logit difference.
     It writes, per row and head, that difference and the LayerNorm mean, which is exactly the SE branch's
     head mean h_bar.
2. `_combine_kernel`, grid (B,): per row, the SE head weights w from h_bar, then keep_score = sum_h w_h (l0_h
   - l1_h) / sum_h w_h (log_softmax[0] - log_softmax[1] = l0 - l1) and keep_prob = sum_h w_h sigmoid(l0_h -
   l1_h) / sum_h w_h; prefix and package rows get +inf / 1.

Scratch: two (T, H) float32 buffers, 1/16 of the token bytes for d = 64 in bf16.
Precision: LayerNorm, GELU, reductions and accumulation in float32; tl.dot operands in the tokens' dtype
(float16 / bfloat16 on tensor cores), or exact float32 ("ieee") for float32 tokens.
Row offsets are 64-bit; segment bounds are clamped to [0, T], so bad cu_seqlens never index out of bounds.
"""

import torch
import triton
import triton.language as tl

_DOT_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _gelu(x):
    # The exact (erf) GELU of the reference.
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _mma(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """a (fp32 registers) @ b (DOT_DTYPE tile), accumulated in fp32.

    EMULATE (TRITON_INTERPRET=1 with bfloat16 only): the interpreter multiplies the raw uint16 bit patterns of
    bfloat16 dot operands (triton-lang/triton#11584), so the operands are rounded to bfloat16 and multiplied
    in float32 instead: the same products (exact in fp32) as the tensor cores.
    """
    if EMULATE:
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b, input_precision=PRECISION)


@triton.jit
def _segment(cu_ptr, b, T, num_packages, num_prefix):
    """Clamped rows [start, end) of image b, its first row of S (after the prefix rows), its rows of S and
    its spatial rows."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), T)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), start), T)
    first = start + tl.minimum(end - start, num_prefix)  # no overflow for any num_prefix
    m = end - first
    n_sp = tl.maximum(m - num_packages, 0)
    return start, end, first, m, n_sp


@triton.jit
def _layer_norm_tile(x_ptr, rows, rmask, stride_x, cols, dmask, lnw, lnb, D: tl.constexpr):
    """LayerNorm (eps 1e-5, affine) of the head slice of `rows`: returns (xn [BM, BD] fp32, mean [BM])."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(dmask[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + 1e-5)
    return xc * rstd[:, None] * lnw[None, :] + lnb[None, :], mean


@triton.jit
def _head_kernel(x_ptr, stride_x, cu_ptr, diff_ptr, hbar_ptr, T, H, num_packages, num_prefix,
                 lnw_ptr, lnb_ptr, w_in_ptr, b_in_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                 BLOCK_D4: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 EMULATE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    D2: tl.constexpr = D // 2
    D4: tl.constexpr = D // 4
    start, end, first, m, n_sp = _segment(cu_ptr, b, T, num_packages, num_prefix)
    row0 = first.to(tl.int64)  # first row of S, 64-bit so that row * stride cannot overflow

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_D2)
    offs_q = tl.arange(0, BLOCK_D4)
    dmask = offs_d < D
    nmask = offs_n < D2
    qmask = offs_q < D4
    cols = h * D + offs_d

    lnw = tl.load(lnw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)

    # ---- pass 1: g = mean over the rows of S of GELU(LN(x) @ W_in[D2:]^T + b_in[D2:]) -------------------
    # W_in[D2 + n, k] as a (k, n) tile, the B operand of the dot.
    kn_mask = dmask[:, None] & nmask[None, :]
    w_glob = tl.load(w_in_ptr + (D2 + offs_n[None, :]) * D + offs_d[:, None], mask=kn_mask, other=0.0)
    w_glob = w_glob.to(tl.float32).to(DOT_DTYPE)
    b_glob = tl.load(b_in_ptr + D2 + offs_n, mask=nmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D2], dtype=tl.float32)
    for r in range(0, m, BLOCK_M):
        rmask = (r + offs_m) < m
        xn, _ = _layer_norm_tile(x_ptr, row0 + r + offs_m, rmask, stride_x, cols, dmask, lnw, lnb, D)
        u = _mma(xn, w_glob, DOT_DTYPE, PRECISION, EMULATE) + b_glob[None, :]
        # Fixed loop order and tile reduction: the same input gives bitwise the same sum.
        acc += tl.sum(tl.where(rmask[:, None], _gelu(u), 0.0), axis=0)
    g = acc / tl.maximum(m, 1).to(tl.float32)
    # bias1 = W1[:, D2:] @ g + b1, computed once per (image, head) in fp32. Tile (k, n) = W1[n, D2 + k].
    offs_k2 = tl.arange(0, BLOCK_D2)
    k2mask = offs_k2 < D2
    kk_mask = k2mask[:, None] & nmask[None, :]
    w1_glob = tl.load(w1_ptr + offs_n[None, :] * D + D2 + offs_k2[:, None], mask=kk_mask, other=0.0)
    b1 = tl.load(b1_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    bias1 = tl.sum(w1_glob.to(tl.float32) * g[:, None], axis=0) + b1

    # ---- pass 2: spatial rows: local half, score MLP, logit difference --------------------------------
    w_loc = tl.load(w_in_ptr + offs_n[None, :] * D + offs_d[:, None], mask=kn_mask, other=0.0)
    w_loc = w_loc.to(tl.float32).to(DOT_DTYPE)
    b_loc = tl.load(b_in_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    w1_loc = tl.load(w1_ptr + offs_n[None, :] * D + offs_k2[:, None], mask=kk_mask, other=0.0)
    w1_loc = w1_loc.to(tl.float32).to(DOT_DTYPE)
    # W2[q, k] as a (k, q) tile.
    w2t = tl.load(w2_ptr + offs_q[None, :] * D2 + offs_k2[:, None], mask=k2mask[:, None] & qmask[None, :],
                  other=0.0).to(tl.float32).to(DOT_DTYPE)
    b2 = tl.load(b2_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
    # Only l0 - l1 is needed: (W3[0] - W3[1]) . h2 + (b3[0] - b3[1]).
    w3d = (tl.load(w3_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
           - tl.load(w3_ptr + D4 + offs_q, mask=qmask, other=0.0).to(tl.float32))
    b3d = tl.load(b3_ptr).to(tl.float32) - tl.load(b3_ptr + 1).to(tl.float32)
    for r in range(0, n_sp, BLOCK_M):
        rmask = (r + offs_m) < n_sp
        rows = row0 + r + offs_m
        xn, mean = _layer_norm_tile(x_ptr, rows, rmask, stride_x, cols, dmask, lnw, lnb, D)
        u = _gelu(_mma(xn, w_loc, DOT_DTYPE, PRECISION, EMULATE) + b_loc[None, :])
        h1 = _gelu(_mma(u, w1_loc, DOT_DTYPE, PRECISION, EMULATE) + bias1[None, :])
        h2 = _gelu(_mma(h1, w2t, DOT_DTYPE, PRECISION, EMULATE) + b2[None, :])
        diff = tl.sum(h2 * w3d[None, :], axis=1) + b3d
        tl.store(diff_ptr + rows * H + h, diff, mask=rmask)
        tl.store(hbar_ptr + rows * H + h, mean, mask=rmask)


@triton.jit
def _combine_kernel(diff_ptr, hbar_ptr, cu_ptr, score_ptr, prob_ptr, T, num_packages, num_prefix,
                    se_w1_ptr, se_b1_ptr, se_w2_ptr, se_b2_ptr,
                    H: tl.constexpr, HH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0)
    start, end, first, m, n_sp = _segment(cu_ptr, b, T, num_packages, num_prefix)
    n_rows = end - start
    n_pre = first - start
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    se_b2 = tl.load(se_b2_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    for r in range(0, n_rows, BLOCK_R):
        local = r + offs_r
        rows = start.to(tl.int64) + local
        in_image = local < n_rows
        spatial = (local >= n_pre) & (local < n_pre + n_sp)
        m2 = spatial[:, None] & hmask[None, :]
        offs = rows[:, None] * H + offs_h[None, :]
        diff = tl.load(diff_ptr + offs, mask=m2, other=0.0)
        hbar = tl.load(hbar_ptr + offs, mask=m2, other=0.0)
        # SE branch: w = sigmoid(se_w2 @ GELU(se_w1 @ h_bar + se_b1) + se_b2), H//2 hidden units.
        z = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32) + se_b2[None, :]
        for j in tl.static_range(HH):
            w1_row = tl.load(se_w1_ptr + j * H + offs_h, mask=hmask, other=0.0).to(tl.float32)
            a = _gelu(tl.sum(hbar * w1_row[None, :], axis=1) + tl.load(se_b1_ptr + j).to(tl.float32))
            w2_col = tl.load(se_w2_ptr + offs_h * HH + j, mask=hmask, other=0.0).to(tl.float32)
            z += a[:, None] * w2_col[None, :]
        w = tl.where(hmask[None, :], tl.sigmoid(z), 0.0)
        w_sum = tl.sum(w, axis=1)
        score = tl.sum(w * diff, axis=1) / w_sum
        prob = tl.sum(w * tl.sigmoid(diff), axis=1) / w_sum
        tl.store(score_ptr + rows, tl.where(spatial, score, float("inf")), mask=in_image)
        tl.store(prob_ptr + rows, tl.where(spatial, prob, 1.0), mask=in_image)


def _pow2(n, minimum=16):
    return max(minimum, triton.next_power_of_2(n))


def token_scores_triton(x, cu_seqlens, num_packages, num_heads, ln_weight, ln_bias, w_in, b_in, w1, b1, w2,
                        b2, w3, b3, se_w1, se_b1, se_w2, se_b2, num_prefix=1):
    """The fused selector on x's device (CUDA, or CPU under TRITON_INTERPRET=1); see ops.token_scores.

    Arguments are already validated (spvit_kernels/ops/_validate.py):
        x (T, C) float32 / float16 / bfloat16, x.stride(1) == 1 (any row stride); cu_seqlens (B+1,) int32;
        with H = num_heads and d = C / H: ln_weight, ln_bias, b_in (d,); w_in (d, d); w1 (d/2, d); b1 (d/2,);
        w2 (d/4, d/2); b2 (d/4,); w3 (2, d/4); b3 (2,); se_w1 (H//2, H); se_b1 (H//2,); se_w2 (H, H//2);
        se_b2 (H,); weights float32 or x's dtype; num_prefix >= 0 unscored rows at the start of every image.
    Returns (keep_score, keep_prob), float32 (T,). Two launches, no host synchronisation.
    """
    T, C = x.shape
    H = num_heads
    d = C // H
    B = cu_seqlens.shape[0] - 1
    dev = x.device
    keep_score = torch.empty((T,), dtype=torch.float32, device=dev)
    keep_prob = torch.empty((T,), dtype=torch.float32, device=dev)
    if T == 0 or B == 0:
        return keep_score, keep_prob
    scratch = torch.empty((2, T, H), dtype=torch.float32, device=dev)  # per row and head: l0 - l1, h_bar
    diff, hbar = scratch[0], scratch[1]
    ws = [t.contiguous() for t in (ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3)]
    se = [t.contiguous() for t in (se_w1, se_b1, se_w2, se_b2)]
    block_d = _pow2(d)
    _head_kernel[(B, H)](
        x, x.stride(0), cu_seqlens, diff, hbar, T, H, num_packages, num_prefix, *ws,
        D=d, BLOCK_M=64, BLOCK_D=block_d, BLOCK_D2=_pow2(d // 2), BLOCK_D4=_pow2(d // 4),
        DOT_DTYPE=_DOT_DTYPE[x.dtype], PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        EMULATE=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        num_warps=4 if block_d <= 64 else 8)
    _combine_kernel[(B,)](
        diff, hbar, cu_seqlens, keep_score, keep_prob, T, num_packages, num_prefix, *se,
        H=H, HH=H // 2, BLOCK_R=64, BLOCK_H=_pow2(H, 2), num_warps=4)
    return keep_score, keep_prob
