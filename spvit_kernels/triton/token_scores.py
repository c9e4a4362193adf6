"""Triton kernels of torch.ops.spvit.token_scores: the fused SPViT selector (SPEC section 2).

Two launches, no host synchronisation, no atomics. Each image's rows are [num_prefix prefix rows (cls, ...),
candidates, num_packages package rows]; S is every row but the prefix.

1. `_head_kernel`, grid (B, H): one program per (image, head), 16-row tiles, runtime loop bounds read from
   cu_seqlens (no max length on the host). x is read once:
   - phase 1 (rows of S): LayerNorm of the head's d channels; u_glob = GELU(xn @ W_in[d/2:]^T + b_in[d/2:])
     on tensor cores, summed over the rows in a fixed order; its mean g enters the first score layer as a
     per-(image, head) bias: W1 @ [local, g] + b1 = W1[:, :d/2] @ local + (W1[:, d/2:] @ g + b1). So the
     local half can go through the first layer before g is known: pre = GELU(xn @ W_in[:d/2]^T +
     b_in[:d/2]) @ W1[:, :d/2]^T is written to scratch (d/2 values per row and head), with the LayerNorm
     mean, which is exactly the SE branch's head mean h_bar.
   - phase 2 (candidate rows, after a block barrier): GELU(pre + bias1), the second GELU layer (tensor
     cores) and the keep-minus-drop logit difference, written per row and head.
2. `_combine_kernel`, grid (B,): per row, the SE head weights w from h_bar, then keep_score = sum_h w_h (l0_h
   - l1_h) / sum_h w_h (log_softmax[0] - log_softmax[1] = l0 - l1) and keep_prob = sum_h w_h sigmoid(l0_h -
   l1_h) / sum_h w_h; prefix and package rows get +inf / 1.

GELU is the exact (erf) form through a polynomial erf (see `_gelu`): accurate to 3e-7 for float32 tokens, to
1.3e-4 for 16-bit tokens (whose dot operands round far coarser); under half the instructions of libdevice's
erf. Offline SASS of both kernels: benchmarks/kernel_report.py.
Scratch: two (T, H) float32 buffers (1/16 of the token bytes for d = 64 in bf16) and pre, (T, H, d/2) in
the tokens' dtype (half the token bytes), written and read back by the same program, mostly from L2.
Precision: LayerNorm, GELU, reductions and accumulation in float32; tl.dot operands in the tokens' dtype
(float16 / bfloat16 on tensor cores), or exact float32 ("ieee") for float32 tokens.
Row offsets are 64-bit; segment bounds are clamped to [0, T], so bad cu_seqlens never index out of bounds.
"""

import contextlib

import torch
import triton
import triton.language as tl

_DOT_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# GELU 0.5 x (1 + erf(x / sqrt 2)) through r = 1 - erf(|x| / sqrt 2) in the form 1 / p(|x|)^n, p a polynomial:
# gelu(x) = max(x, 0) - 0.5 |x| r for either sign. The 0.5 is folded into p's coefficients as a factor
# 2^(1/n): 0.5 r is then one MUFU.RSQ of a power of p and squarings, never an IEEE division.
# Large |x| give p^n = inf, rsqrt = 0 and gelu = max(x, 0) (never NaN for finite x).
#  - float32 tokens (FAST_GELU False): erf(z) = 1 - 1 / (1 + a1 z + ... + a6 z^6)^16 (Abramowitz & Stegun
#    7.1.28, |erf error| <= 3e-7, the same formula as csrc/cpu/token_scores_cpu.cpp), the coefficients
#    a_k 2^(-k/2) 2^(1/16): 6 FMAs, 13 FP32 instructions and a MUFU per element.
#  - 16-bit tokens (FAST_GELU True): n = 8 and a degree-4 p fitted for the smallest largest |erf error| on
#    [0, 9] (weighted least squares, reweighted towards minimax). Measured against torch.erf in float64 on
#    [-12, 12] (4M points, evaluated in float32): |erf error| <= 1.3e-4 (largest near 0, where the GELU
#    multiplies it by |x|), |gelu error| <= 1.9e-4 (near |x| = 3) -- below the rounding of the GELU's output
#    to the 16-bit dot operands (fp16: 4.9e-4 relative) and invisible in the interpreter tests' errors.
#    10 FP32 instructions and a MUFU: the GELU is most of the kernel's FP32 work (112 per row and head at
#    d = 64).
@triton.jit
def _gelu(x, FAST_GELU: tl.constexpr):
    a = tl.abs(x)
    if FAST_GELU:
        q = 3.0176627490863476e-03 * a + 5.5212200500600606e-03
        q = q * a + 5.143471319136756e-02
        q = q * a + 1.0821423102305804e-01
        q = q * a + 1.0905242615128075
        q = q * q
        q = q * q
        s = tl.math.rsqrt(q * q)  # 2^(-1/2) p^-4
        return tl.maximum(x, 0.0) - a * (s * s)
    else:
        q = 5.6212996639622074e-06 * a + 5.105520900865983e-05
        q = q * a + 3.96861370110139e-05
        q = q * a + 0.0034227392389008246
        q = q * a + 0.022076998456581714
        q = q * a + 0.052075163036630574
        q = q * a + 1.0442737824274138
        q = q * q
        q = q * q
        s = tl.math.rsqrt(q * q)  # 2^(-1/2) q^-4
        s = s * s
        return tl.maximum(x, 0.0) - a * (s * s)


@triton.jit
def _mma(a, b, c, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """c + a (fp32 registers) @ b (DOT_DTYPE tile), accumulated in fp32 (c: the bias, broadcast to the output
    tile, so that the tensor cores add it).

    EMULATE (TRITON_INTERPRET=1 with bfloat16 only): the interpreter multiplies the raw uint16 bit patterns of
    bfloat16 dot operands (triton-lang/triton#11584), so the operands are rounded to bfloat16 and multiplied
    in float32 instead: the same products (exact in fp32) as the tensor cores.
    """
    if EMULATE:
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(tl.float32), c, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b, c, input_precision=PRECISION)


@triton.jit
def _segment(cu_ptr, b, T, num_packages, num_prefix):
    """Clamped rows [start, end) of image b, its rows of S (all but the prefix) and its candidate rows."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), T)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), start), T)
    m = tl.maximum(end - start - num_prefix, 0)
    n_sp = tl.maximum(m - num_packages, 0)
    return start, end, m, n_sp


@triton.jit
def _centered_tile(x_img, lr, rmask, stride_x, offs_d, dmask, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The head slice of rows lr (offsets from x_img): (x - mean [BM, BD] fp32, mean [BM], rstd [BM]) of the
    LayerNorm (eps 1e-5); its affine part is folded into the next layer's weights."""
    x = tl.load(x_img + lr[:, None] * stride_x + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = x - mean[:, None]
    if D != BLOCK_D:  # padded columns must not enter the variance
        xc = tl.where(dmask[None, :], xc, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + 1e-5)
    return xc, mean, rstd


@triton.jit(do_not_specialize=["T", "num_packages", "num_prefix"])
def _head_kernel(x_ptr, stride_x, cu_ptr, pre_ptr, diff_ptr, hbar_ptr, T, H, num_packages, num_prefix,
                 lnw_ptr, lnb_ptr, w_in_ptr, b_in_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                 BLOCK_D4: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 EMULATE: tl.constexpr, OFFSETS_64: tl.constexpr, FAST_GELU: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    D2: tl.constexpr = D // 2
    D4: tl.constexpr = D // 4
    start, end, m, n_sp = _segment(cu_ptr, b, T, num_packages, num_prefix)
    row0 = start.to(tl.int64) + num_prefix  # first row of S, 64-bit so that row * stride cannot overflow

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_D2)
    offs_k2 = tl.arange(0, BLOCK_D2)
    offs_q = tl.arange(0, BLOCK_D4)
    dmask = offs_d < D
    nmask = offs_n < D2
    k2mask = offs_k2 < D2
    qmask = offs_q < D4

    # 64-bit scalar bases of this image and head; 32-bit offsets inside the image unless T * row stride
    # can reach 2**31 (OFFSETS_64), which keeps the per-element address arithmetic small.
    pre_row: tl.constexpr = BLOCK_D2  # scratch row of one (row, head)
    x_img = x_ptr + row0 * stride_x + h * D
    pre_img = pre_ptr + (row0 * H + h) * pre_row
    hbar_img = hbar_ptr + row0 * H + h
    diff_img = diff_ptr + row0 * H + h
    if OFFSETS_64:
        offs_m = offs_m.to(tl.int64)

    # LayerNorm's affine part folded into W_in: (xc * rstd * lnw + lnb) @ W^T = rstd * (xc @ (W * lnw)^T) +
    # W @ lnb, so the rows need only x - mean and rstd. W_in[n, k] (local half) and W_in[D2 + n, k] (global
    # half) as (k, n) tiles, the B operands of the dots.
    lnw = tl.load(lnw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    kn_mask = dmask[:, None] & nmask[None, :]
    w_loc = tl.load(w_in_ptr + offs_n[None, :] * D + offs_d[:, None], mask=kn_mask, other=0.0).to(tl.float32)
    b_loc = tl.load(b_in_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32) + tl.sum(w_loc * lnb[:, None], 0)
    w_loc = (w_loc * lnw[:, None]).to(DOT_DTYPE)
    w_glob = tl.load(w_in_ptr + (D2 + offs_n[None, :]) * D + offs_d[:, None], mask=kn_mask,
                     other=0.0).to(tl.float32)
    b_glob = (tl.load(b_in_ptr + D2 + offs_n, mask=nmask, other=0.0).to(tl.float32)
              + tl.sum(w_glob * lnb[:, None], 0))
    w_glob = (w_glob * lnw[:, None]).to(DOT_DTYPE)
    kk_mask = k2mask[:, None] & nmask[None, :]
    w1_loc = tl.load(w1_ptr + offs_n[None, :] * D + offs_k2[:, None], mask=kk_mask, other=0.0)
    w1_loc = w1_loc.to(tl.float32).to(DOT_DTYPE)

    # ---- phase 1, the one pass over x (rows of S): LayerNorm; the global half GELU(xn @ W_in[D2:]^T +
    # b_in[D2:]) summed over the rows in a fixed order; the local half u_loc = GELU(xn @ W_in[:D2]^T +
    # b_in[:D2]) taken through the first score layer's local columns, pre = u_loc @ W1[:, :D2]^T, which does
    # not need the global mean g yet. pre (D2 values per row and head) goes to scratch, the LayerNorm mean
    # (the SE branch's h_bar) to hbar.
    zero_mn = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    # Per-position partial sums, reduced over the rows once after the loop (not a cross-lane reduction per
    # tile). Fixed loop order and tile reduction: the same input gives bitwise the same sum.
    acc = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    for r in range(0, m, BLOCK_M):
        lr = r + offs_m  # rows from row0
        rmask = lr < m
        xc, mean, rstd = _centered_tile(x_img, lr, rmask, stride_x, offs_d, dmask, D, BLOCK_D)
        u = _gelu(_mma(xc, w_glob, zero_mn, DOT_DTYPE, PRECISION, EMULATE) * rstd[:, None] + b_glob[None, :],
                  FAST_GELU)
        acc += tl.where(rmask[:, None], u, 0.0)
        smask = lr < n_sp
        u_loc = _gelu(_mma(xc, w_loc, zero_mn, DOT_DTYPE, PRECISION, EMULATE) * rstd[:, None] + b_loc[None, :],
                      FAST_GELU)
        pre = _mma(u_loc, w1_loc, zero_mn, DOT_DTYPE, PRECISION, EMULATE)
        tl.store(pre_img + lr[:, None] * (H * pre_row) + offs_n[None, :], pre.to(pre_ptr.dtype.element_ty),
                 mask=smask[:, None])
        tl.store(hbar_img + lr * H, mean, mask=smask)
    g = tl.sum(acc, axis=0) / tl.maximum(m, 1).to(tl.float32)
    # bias1 = W1[:, D2:] @ g + b1, once per (image, head) in fp32. Tile (k, n) = W1[n, D2 + k].
    w1_glob = tl.load(w1_ptr + offs_n[None, :] * D + D2 + offs_k2[:, None], mask=kk_mask, other=0.0)
    b1 = tl.load(b1_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    bias1 = tl.sum(w1_glob.to(tl.float32) * g[:, None], axis=0) + b1
    # W2[q, k] as a (k, q) tile.
    w2t = tl.load(w2_ptr + offs_q[None, :] * D2 + offs_k2[:, None], mask=k2mask[:, None] & qmask[None, :],
                  other=0.0).to(tl.float32).to(DOT_DTYPE)
    b2 = tl.load(b2_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
    b2_tile = tl.zeros([BLOCK_M, BLOCK_D4], dtype=tl.float32) + b2[None, :]
    # Only l0 - l1 is needed: (W3[0] - W3[1]) . h2 + (b3[0] - b3[1]).
    w3d = (tl.load(w3_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
           - tl.load(w3_ptr + D4 + offs_q, mask=qmask, other=0.0).to(tl.float32))
    b3d = tl.load(b3_ptr).to(tl.float32) - tl.load(b3_ptr + 1).to(tl.float32)
    # The scratch rows were written by other threads of this program: make them visible (block barrier).
    tl.debug_barrier()

    # ---- phase 2 (candidate rows, reading back D2 floats per row instead of x): the rest of the score MLP
    # and the keep-minus-drop logit difference.
    for r in range(0, n_sp, BLOCK_M):
        lr = r + offs_m
        rmask = lr < n_sp
        pre = tl.load(pre_img + lr[:, None] * (H * pre_row) + offs_n[None, :], mask=rmask[:, None],
                      other=0.0).to(tl.float32)
        h1 = _gelu(pre + bias1[None, :], FAST_GELU)
        h2 = _gelu(_mma(h1, w2t, b2_tile, DOT_DTYPE, PRECISION, EMULATE), FAST_GELU)
        diff = tl.sum(h2 * w3d[None, :], axis=1) + b3d
        tl.store(diff_img + lr * H, diff, mask=rmask)


@triton.jit(do_not_specialize=["T", "num_packages", "num_prefix"])
def _combine_kernel(diff_ptr, hbar_ptr, cu_ptr, score_ptr, prob_ptr, T, num_packages, num_prefix,
                    se_w1_ptr, se_b1_ptr, se_w2_ptr, se_b2_ptr,
                    H: tl.constexpr, HH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0)
    start, end, m, n_sp = _segment(cu_ptr, b, T, num_packages, num_prefix)
    n_rows = end - start
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    se_b2 = tl.load(se_b2_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    for r in range(0, n_rows, BLOCK_R):
        local = r + offs_r
        rows = start.to(tl.int64) + local
        in_image = local < n_rows
        spatial = (local >= num_prefix) & (local < num_prefix + n_sp)
        m2 = spatial[:, None] & hmask[None, :]
        offs = rows[:, None] * H + offs_h[None, :]
        diff = tl.load(diff_ptr + offs, mask=m2, other=0.0)
        hbar = tl.load(hbar_ptr + offs, mask=m2, other=0.0)
        # SE branch: w = sigmoid(se_w2 @ GELU(se_w1 @ h_bar + se_b1) + se_b2), H//2 hidden units.
        z = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32) + se_b2[None, :]
        for j in tl.static_range(HH):
            w1_row = tl.load(se_w1_ptr + j * H + offs_h, mask=hmask, other=0.0).to(tl.float32)
            a = _gelu(tl.sum(hbar * w1_row[None, :], axis=1) + tl.load(se_b1_ptr + j).to(tl.float32), False)
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


# Rows per tile of the per-head kernel: 16 wastes the fewest padded rows on ViT images (196 rows of S in 208,
# 122 in 128, 74 in 80, 30 in 32) and is the smallest tl.dot M.
HEAD_BLOCK_M = 16
COMBINE_BLOCK_R = 64


def launch_meta(channels, num_heads, dtype, *, interpret, offsets_64=False):
    """Constexprs and warps of the two kernels for (C, H, token dtype): {kernel name: dict(constexprs,
    num_warps)}. What a launch compiles, also used by spvit_kernels.kernel_report."""
    d = channels // num_heads
    block_d = _pow2(d)
    head = dict(D=d, BLOCK_M=HEAD_BLOCK_M, BLOCK_D=block_d, BLOCK_D2=_pow2(d // 2), BLOCK_D4=_pow2(d // 4),
                DOT_DTYPE=_DOT_DTYPE[dtype], PRECISION="ieee" if dtype == torch.float32 else "tf32",
                EMULATE=dtype == torch.bfloat16 and interpret, OFFSETS_64=offsets_64,
                FAST_GELU=dtype != torch.float32)
    combine = dict(H=num_heads, HH=num_heads // 2, BLOCK_R=COMBINE_BLOCK_R, BLOCK_H=_pow2(num_heads, 2))
    # One warp per 16-row tile: with more, the warps split the dots' N and each recomputes the GELU of the
    # A operand (benchmarks/kernel_report.py: 3,908 instead of 3,100 SASS per row and head for DeiT-S bf16).
    # float32's IEEE dots run on FMA and need 4 warps' registers (2 warps spill).
    warps = 4 if dtype == torch.float32 else (1 if block_d <= 64 else 2)
    return {"_head_kernel": dict(constexprs=head, num_warps=warps),
            "_combine_kernel": dict(constexprs=combine, num_warps=4)}


def token_scores_triton(x, cu_seqlens, num_packages, num_heads, ln_weight, ln_bias, w_in, b_in, w1, b1, w2,
                        b2, w3, b3, se_w1, se_b1, se_w2, se_b2, num_prefix=1):
    """The fused selector on x's device (CUDA, or CPU under TRITON_INTERPRET=1); see ops.token_scores.

    Arguments are already validated (spvit_kernels/ops/_validate.py):
        x (T, C) float32 / float16 / bfloat16, x.stride(1) == 1 (any row stride); cu_seqlens (B+1,) int32;
        with H = num_heads and d = C / H: ln_weight, ln_bias, b_in (d,); w_in (d, d); w1 (d/2, d); b1 (d/2,);
        w2 (d/4, d/2); b2 (d/4,); w3 (2, d/4); b3 (2,); se_w1 (H//2, H); se_b1 (H//2,); se_w2 (H, H//2);
        se_b2 (H,); weights float32 or x's dtype. num_prefix (int >= 0): leading rows of each image that are
        not scored (+inf / 1) and not in the global mean.
    Returns (keep_score, keep_prob), float32 (T,). Two launches, no host synchronisation.
    Compiled variants: T, num_packages and num_prefix are runtime values (not specialised), so a model
    compiles one per-head and one combine kernel per (token dtype, C, H) -- times Triton's usual 16-byte
    alignment / divisibility specialisation of the pointers and of x's row stride.
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
    # Offsets inside an image are 32-bit unless a row offset times the row stride (of x or of the scratch)
    # can reach 2**31.
    offsets_64 = T * max(x.stride(0), H * _pow2(d // 2)) >= 2**31
    metas = launch_meta(C, H, x.dtype, interpret=dev.type == "cpu", offsets_64=offsets_64)
    head, combine = metas["_head_kernel"], metas["_combine_kernel"]
    scratch = torch.empty((2, T, H), dtype=torch.float32, device=dev)  # per row and head: l0 - l1, h_bar
    diff, hbar = scratch[0], scratch[1]
    # Per row and head, the first score layer's local pre-activation: x's dtype (16-bit data feeds 16-bit
    # tensor-core dots anyway), float32 for float32 tokens.
    pre = torch.empty((T, H, head["constexprs"]["BLOCK_D2"]), dtype=x.dtype, device=dev)
    ws = [t.contiguous() for t in (ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3)]
    se = [t.contiguous() for t in (se_w1, se_b1, se_w2, se_b2)]
    device_ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        _head_kernel[(B, H)](x, x.stride(0), cu_seqlens, pre, diff, hbar, T, H, num_packages, num_prefix, *ws,
                             **head["constexprs"], num_warps=head["num_warps"])
        _combine_kernel[(B,)](diff, hbar, cu_seqlens, keep_score, keep_prob, T, num_packages, num_prefix, *se,
                              **combine["constexprs"], num_warps=combine["num_warps"])
    return keep_score, keep_prob
