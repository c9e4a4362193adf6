"""Triton kernels of torch.ops.spvit.token_scores: the fused SPViT selector (design section 2).

Two launches, no host synchronisation, no atomics. Each image's rows are [num_prefix prefix rows (cls, ...),
candidates, num_packages package rows]; S is every row but the prefix.

1. `_head_kernel`, grid (B, H): one program per (image, head), 16-row tiles, runtime loop bounds read from
   cu_seqlens (no max length on the host). Nothing but three floats per row and head leaves the chip:
   - pass 1 (rows of S): the LayerNorm statistics of the head's d channels (mean = the SE branch's head
     mean h_bar, and rstd, both written per row and head); the global half u = GELU(LN(x) @ W_in[d/2:]^T +
     b_in[d/2:]) on tensor cores, summed over the rows in a fixed order, so that its mean g is known when
     the pass ends.
   - pass 2 (candidate rows, after a block barrier), reading the program's own x rows again (from L2, just
     read in pass 1): the local half GELU(LN(x) @ W_in[:d/2]^T + b_in[:d/2]), the first score layer with g
     entering as a per-(image, head) bias -- W1 @ [local, g] + b1 = W1[:, :d/2] @ local + (W1[:, d/2:] @ g +
     b1) --, the second, and the keep-minus-drop logit difference, written per row and head.
   The LayerNorm's affine part and its centring are folded into W_in (`_ln_folded_half`): the rows need only
   rstd. For 16-bit tokens the row sums of x and x^2 run on the tensor cores too (`_layer_norm_stats`), so
   the FP32 pipe, which binds this kernel on an A100, is left mostly to the GELUs.
2. `_combine_kernel`, grid (B,): per row, the SE head weights w from h_bar, then keep_score = sum_h w_h (l0_h
   - l1_h) / sum_h w_h (log_softmax[0] - log_softmax[1] = l0 - l1) and keep_prob = sum_h w_h sigmoid(l0_h -
   l1_h) / sum_h w_h; prefix and package rows get +inf / 1.

GELU is the exact (erf) form through 0.5 erfc = exp2(polynomial) (see `_gelu`): accurate to 1e-6 for
float32 tokens, to 5.5e-5 for 16-bit tokens (whose dot operands round far coarser); a third of the
instructions of libdevice's erf. Offline SASS of both kernels: benchmarks/kernel_report.py.
Scratch: three (T, H) float32 buffers (l0 - l1, h_bar, rstd: 3/32 of the token bytes for d = 64 in bf16).
Precision: LayerNorm statistics, GELU, reductions and accumulation in float32; tl.dot operands in the
tokens' dtype (float16 / bfloat16 on tensor cores; x itself unrounded), or exact float32 ("ieee") for float32
tokens, whose rows are also centred before their dot. With 16-bit tokens the centring sits in the rounded
weights, so the dot's rounding error grows with a head slice's |mean| / std (tests check a common offset of
5 standard deviations).
Row offsets are 64-bit; segment bounds are clamped to [0, T], so bad cu_seqlens never index out of bounds.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .gelu import gelu_poly

_DOT_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# GELU through 0.5 erfc = exp2(polynomial) (spvit_kernels/triton/gelu.py): FAST_GELU (16-bit tokens) the degree-3
# form, |gelu error| <= 5.5e-5, 5 FP32 instructions and a MUFU per element -- the GELU is most of the kernel's
# FP32 work (112 per row and head at d = 64); float32 tokens and the SE branch the degree-5 form (< 1e-6).
_gelu = gelu_poly


@triton.jit
def _mma(a, b, c, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """c + a @ b (a: fp32 or DOT_DTYPE registers, b: a DOT_DTYPE tile), accumulated in fp32 (c: the bias,
    broadcast to the output tile, so that the tensor cores add it).

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
def _load_head_rows(x_img, lr, rmask, stride_x, offs_d, dmask):
    """The head slice of rows lr (offsets from x_img) in the tokens' dtype, zero where masked."""
    return tl.load(x_img + lr[:, None] * stride_x + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                   other=0.0)


@triton.jit
def _layer_norm_stats(x, dmask, D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      PRECISION: tl.constexpr, EMULATE: tl.constexpr, EXACT_LN: tl.constexpr):
    """(dot operand, mean, rstd) of the rows of the tile x (LayerNorm eps 1e-5).

    The operand goes into a dot with centred weights (`_ln_folded_half`), which subtract the mean themselves.
    EXACT_LN (float32 tokens): the rows centred (x - mean: the dot then sees no large common offset) and the
    variance of the centred rows. Otherwise (16-bit tokens) x itself, and the row sums on the tensor cores,
    exact products in fp32: sum x = x @ e0 (e0: ones in the first column), sum x^2 = the diagonal of the Gram
    tile x @ x^T; the variance is E[x^2] - mean^2 in fp32, whose relative error, about 1e-7 (1 + mean^2 /
    var), stays far below the tokens' own rounding (bf16: 3.9e-3). This takes the LayerNorm off the FP32 pipe,
    which binds the kernel."""
    if EXACT_LN:
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=1) / D
        xc = xf - mean[:, None]
        if D != BLOCK_D:  # padded columns must not enter the variance
            xc = tl.where(dmask[None, :], xc, 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + 1e-5)
        # |x - mean| beyond ~1e18: the squares overflow (rstd would be 0 and LN(x) a finite wrong number). LN is
        # scale invariant, so such rows take the variance of the row scaled by its largest |x - mean|; rows with
        # inf / NaN stay NaN. A run-time branch: ordinary tiles skip the second pass.
        amax = tl.max(tl.abs(xc), axis=1)
        if tl.max(amax, axis=0) > 1e18:
            big = amax > 1e18
            inv = 1.0 / tl.where(big, amax, 1.0)
            xs = xc * inv[:, None]
            # (a big row's scaled sum is >= 1 / D; the floor only keeps the other rows' unused lanes finite)
            rstd = tl.where(big, inv * tl.math.rsqrt(tl.maximum(tl.sum(xs * xs, axis=1) / D, 1e-30)), rstd)
        return xc, mean, rstd
    else:
        BM: tl.constexpr = x.shape[0]
        zero = tl.zeros([BM, BM], dtype=tl.float32)
        col = tl.arange(0, BM)
        e0 = tl.where((tl.arange(0, BLOCK_D)[:, None] >= 0) & (col[None, :] == 0), 1.0, 0.0).to(DOT_DTYPE)
        mean = tl.sum(_mma(x, e0, zero, DOT_DTYPE, PRECISION, EMULATE), axis=1) / D
        gram = _mma(x, tl.trans(x), zero, DOT_DTYPE, PRECISION, EMULATE)
        sumsq = tl.sum(tl.where(col[:, None] == col[None, :], gram, 0.0), axis=1)
        var = tl.maximum(sumsq / D - mean * mean, 0.0)
        var = tl.where(sumsq <= 3.4e38, var, float("nan"))  # overflowed squares: NaN, never a finite wrong LN
        return x, mean, tl.math.rsqrt(var + 1e-5)


@triton.jit
def _ln_folded_half(w_in_ptr, b_in_ptr, lnw, lnb, row0_w, offs_d, offs_n, dmask, nmask,
                    D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Half of the first layer, rows row0_w .. row0_w + D/2 of W_in, with the LayerNorm's affine part and its
    centring folded in: LN(x) @ W^T + b = rstd * (x @ W'^T) + b', where W'[n, k] = W[n, k] lnw[k] - mean_k of
    that, and b' = b + W @ lnb. The centred weights make x @ W'^T = (x - mean) @ (W lnw)^T, so the rows need
    only rstd, never x - mean. Returns (W' as a (k, n) DOT_DTYPE tile, b' (n,) fp32)."""
    kn_mask = dmask[:, None] & nmask[None, :]
    w = tl.load(w_in_ptr + (row0_w + offs_n[None, :]) * D + offs_d[:, None], mask=kn_mask, other=0.0)
    w = w.to(tl.float32)
    b = tl.load(b_in_ptr + row0_w + offs_n, mask=nmask, other=0.0).to(tl.float32) + tl.sum(w * lnb[:, None], 0)
    w = w * lnw[:, None]
    w = tl.where(kn_mask, w - (tl.sum(w, axis=0) / D)[None, :], 0.0)
    return w.to(DOT_DTYPE), b


@triton.jit(do_not_specialize=["T", "num_packages", "num_prefix"])
def _head_kernel(x_ptr, stride_x, cu_ptr, diff_ptr, hbar_ptr, rstd_ptr, T, H, num_packages, num_prefix,
                 lnw_ptr, lnb_ptr, w_in_ptr, b_in_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                 BLOCK_D4: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 EMULATE: tl.constexpr, OFFSETS_64: tl.constexpr, FAST_GELU: tl.constexpr,
                 EXACT_LN: tl.constexpr):
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
    x_img = x_ptr + row0 * stride_x + h * D
    hbar_img = hbar_ptr + row0 * H + h
    rstd_img = rstd_ptr + row0 * H + h
    diff_img = diff_ptr + row0 * H + h
    if OFFSETS_64:
        offs_m = offs_m.to(tl.int64)

    lnw = tl.load(lnw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    w_glob, b_glob = _ln_folded_half(w_in_ptr, b_in_ptr, lnw, lnb, D2, offs_d, offs_n, dmask, nmask, D, DOT_DTYPE)
    zero_mn = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)

    # ---- pass 1 over the rows of S: LayerNorm statistics (mean = the SE branch's h_bar, and rstd, kept for
    # pass 2) and the global half u = GELU(LN(x) @ W_in[D2:]^T + b_in[D2:]) summed over the rows, in a fixed
    # order: the same input gives bitwise the same sum. 16-bit tokens: the column sums of u (rounded to the dot
    # dtype, as every dot operand here) on the tensor cores, e0 @ u with e0 = ones in the first row, into row
    # 0 of acc, instead of 32 FP32 adds per row; float32 tokens: per-position partial sums, reduced once after
    # the loop. Padded rows of the last tile are not masked in the loop (x = 0 there gives u = GELU(b'),
    # exactly): their sum is taken off once after it.
    acc = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    e0 = tl.where((offs_m[:, None] == 0) & (offs_m[None, :] >= 0), 1.0, 0.0)
    for r in range(0, m, BLOCK_M):
        lr = r + offs_m  # rows from row0
        rmask = lr < m
        x = _load_head_rows(x_img, lr, rmask, stride_x, offs_d, dmask)
        x, mean, rstd = _layer_norm_stats(x, dmask, D, BLOCK_D, DOT_DTYPE, PRECISION, EMULATE, EXACT_LN)
        u = _gelu(_mma(x, w_glob, zero_mn, DOT_DTYPE, PRECISION, EMULATE) * rstd[:, None] + b_glob[None, :],
                  FAST_GELU)
        if EXACT_LN:
            acc += u
        else:
            acc = _mma(e0, u.to(DOT_DTYPE), acc, DOT_DTYPE, PRECISION, EMULATE)
        smask = lr < n_sp
        tl.store(hbar_img + lr * H, mean, mask=smask)
        tl.store(rstd_img + lr * H, rstd, mask=smask)
    n_pad = (tl.cdiv(m, BLOCK_M) * BLOCK_M - m).to(tl.float32)
    u_pad = _gelu(b_glob, FAST_GELU)
    if not EXACT_LN:
        u_pad = u_pad.to(DOT_DTYPE).to(tl.float32)
    g = (tl.sum(acc, axis=0) - n_pad * u_pad) / tl.maximum(m, 1).to(tl.float32)

    # The rest of the score MLP. The first score layer on [local, g]: W1 @ [local, g] + b1 = W1[:, :D2] @ local
    # + bias1 with bias1 = W1[:, D2:] @ g + b1, once per (image, head) in fp32, added by the tensor cores.
    w_loc, b_loc = _ln_folded_half(w_in_ptr, b_in_ptr, lnw, lnb, 0, offs_d, offs_n, dmask, nmask, D, DOT_DTYPE)
    kk_mask = k2mask[:, None] & nmask[None, :]
    w1_loc = tl.load(w1_ptr + offs_n[None, :] * D + offs_k2[:, None], mask=kk_mask, other=0.0)
    w1_loc = w1_loc.to(tl.float32).to(DOT_DTYPE)
    w1_glob = tl.load(w1_ptr + offs_n[None, :] * D + D2 + offs_k2[:, None], mask=kk_mask, other=0.0)
    b1 = tl.load(b1_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    bias1 = zero_mn + (tl.sum(w1_glob.to(tl.float32) * g[:, None], axis=0) + b1)[None, :]
    # W2[q, k] as a (k, q) tile.
    w2t = tl.load(w2_ptr + offs_q[None, :] * D2 + offs_k2[:, None], mask=k2mask[:, None] & qmask[None, :],
                  other=0.0).to(tl.float32).to(DOT_DTYPE)
    b2 = tl.load(b2_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
    b2_tile = tl.zeros([BLOCK_M, BLOCK_D4], dtype=tl.float32) + b2[None, :]
    # Only l0 - l1 is needed: (W3[0] - W3[1]) . h2 + (b3[0] - b3[1]).
    w3d = (tl.load(w3_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
           - tl.load(w3_ptr + D4 + offs_q, mask=qmask, other=0.0).to(tl.float32))
    b3d = tl.load(b3_ptr).to(tl.float32) - tl.load(b3_ptr + 1).to(tl.float32)
    # rstd (and h_bar) were written by other threads of this program: make them visible (block barrier).
    tl.debug_barrier()

    # ---- pass 2 over the candidate rows, x read again (from L2: this program read it just before): the local
    # half, the rest of the score MLP and the keep-minus-drop logit difference, per row and head.
    for r in range(0, n_sp, BLOCK_M):
        lr = r + offs_m
        rmask = lr < n_sp
        x = _load_head_rows(x_img, lr, rmask, stride_x, offs_d, dmask)
        rstd = tl.load(rstd_img + lr * H, mask=rmask, other=0.0)
        if EXACT_LN:  # float32 tokens: the rows centred as in pass 1 (the mean is h_bar, written there)
            x = tl.where(dmask[None, :], x - tl.load(hbar_img + lr * H, mask=rmask, other=0.0)[:, None], 0.0)
        u_loc = _gelu(_mma(x, w_loc, zero_mn, DOT_DTYPE, PRECISION, EMULATE) * rstd[:, None] + b_loc[None, :],
                      FAST_GELU)
        h1 = _gelu(_mma(u_loc, w1_loc, bias1, DOT_DTYPE, PRECISION, EMULATE), FAST_GELU)
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
                FAST_GELU=dtype != torch.float32, EXACT_LN=dtype == torch.float32)
    combine = dict(H=num_heads, HH=num_heads // 2, BLOCK_R=COMBINE_BLOCK_R, BLOCK_H=_pow2(num_heads, 2))
    # One warp per 16-row tile: with more, the warps split the dots' N and each recomputes the GELU of the
    # A operand (an earlier version of this kernel: 3,908 instead of 3,100 SASS per row and head, DeiT-S bf16).
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
    offsets_64 = T * max(x.stride(0), H) >= 2**31
    metas = launch_meta(C, H, x.dtype, interpret=dev.type == "cpu", offsets_64=offsets_64)
    head, combine = metas["_head_kernel"], metas["_combine_kernel"]
    # Per row and head: l0 - l1, h_bar (the LayerNorm mean) and the LayerNorm's rstd (pass 1 to pass 2).
    scratch = torch.empty((3, T, H), dtype=torch.float32, device=dev)
    diff, hbar, rstd = scratch[0], scratch[1], scratch[2]
    ws = [t.contiguous() for t in (ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3)]
    se = [t.contiguous() for t in (se_w1, se_b1, se_w2, se_b2)]
    device_ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        _head_kernel[(B, H)](x, x.stride(0), cu_seqlens, diff, hbar, rstd, T, H, num_packages, num_prefix, *ws,
                             **head["constexprs"], num_warps=head["num_warps"])
        _combine_kernel[(B,)](diff, hbar, cu_seqlens, keep_score, keep_prob, T, num_packages, num_prefix, *se,
                              **combine["constexprs"], num_warps=combine["num_warps"])
    return keep_score, keep_prob
