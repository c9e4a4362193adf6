"""Triton forward and backward of the selector's training form (torch.ops.spvit.selector_train).

    score, prob, u_loc, glob, mean, rstd = selector_train_fwd_triton(S, weights, num_heads, *14 weights)
    dS, dweights, *14 grads = selector_train_bwd_triton(dscore, dprob, S, weights, num_heads, *14 weights,
                                                        score, prob, u_loc, glob, mean, rstd)

The math and its chain rule: spvit_kernels/reference/selector_train.py (the kernels follow `backward_math` step by
step). S (B, M, C) float32 / float16 / bfloat16 with a contiguous last dim; weights (B, M) float32; d = C / H is
padded to BLOCK_D = the next power of two >= 16 (masked), as are d/2 and d/4 (tl.dot's smallest tile is 16).

Four launches, no atomics: every sum over rows runs in a fixed order (bitwise reproducible), the ones that cross
programs as per-program partials summed afterwards (in the next kernel, or by torch.sum for the weight gradients).
  forward
    `_fwd_head_kernel`     grid (row chunks, B * H): LayerNorm (mean = the SE branch's head mean, rstd: both saved),
                           u = GELU(LN(x) W_in^T + b_in) (one BLOCK_M x BLOCK_D x BLOCK_D dot), u's local half
                           stored, the m-weighted row sums of its global half as one partial per chunk.
    `_fwd_combine_kernel`  grid (row tiles, B): the global mean (the chunks' partials summed / max(sum m, tiny),
                           saved by tile 0), the SE head weights, then per head (a loop inside the kernel) the score
                           MLP on [u_loc, glob] (glob enters as a bias: W1[:, d2:] glob + b1) and the combine.
  backward (recomputes the MLP from the saved u_loc / glob and the LayerNorm from S and the saved statistics)
    `_bwd_combine_kernel`  grid (row tiles, B): per head the combine's and the MLP's backward -> du_loc, the
                           tile's partial of dglob = sum_i dz_i[d2:], d(head weight) per row and head; then the SE
                           backward -> dhbar. Partials of dW1, db1, dW2, db2, dW3, db3 and the SE weights per tile.
    `_bwd_head_kernel`     grid (row chunks, B * H): dglob summed over the tiles, du = [du_loc, m_i / T dglob],
                           back through GELU, W_in (two dots) and the LayerNorm -> dS (+ dhbar / d), dm per row and
                           head (summed over heads by torch), partials of dW_in, db_in, dgamma, dbeta per chunk.
                           Wide heads (d > 64): da and the LayerNorm output ln written instead of dW_in's partial,
                           and dW_in = da^T ln one PyTorch GEMM over all rows and heads (float32; see launch_meta).
Precision: statistics, GELU (exact erf), softmax, dot operands and accumulation in float32. S enters no dot (the
LayerNorm comes first), so every tl.dot multiplies float32 intermediates: as TF32 on the tensor cores for 16-bit S,
exact float32 ("ieee", FMA) for float32 S unless torch.backends.cuda.matmul.allow_tf32 (see `dot_precision`).
Under TRITON_INTERPRET=1, whose dots are exact float32, the TF32 operand rounding is emulated (EMULATE_TF32).
"""

import contextlib

import torch
import triton
import triton.language as tl

from ..ops._validate import SELECTOR_TRAIN_TRITON_HEAD_DIMS
from .gelu import gelu_erf, gelu_erf_and_grad
from .varlen_attention import _dot_precision

_TINY = torch.finfo(torch.float32).tiny  # the global mean's denominator floor, as float32 train_scores clamps it


# The exact GELU x Phi(x) through libdevice's erf, as F.gelu (the training form's reference).
_gelu, _gelu_and_grad = gelu_erf, gelu_erf_and_grad


@triton.jit
def _round_tf32(x):
    """x rounded to TF32 (10-bit mantissa, to nearest, ties away from zero: cvt.rna.tf32.f32), kept as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
    """a @ b, float32 operands and accumulation ("tf32": on the tensor cores). EMULATE_TF32 (TRITON_INTERPRET=1
    only, where every dot is exact float32): the operands rounded as the tensor cores round them."""
    if EMULATE_TF32:
        return tl.dot(_round_tf32(a), _round_tf32(b), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _se_hidden(hbar, se_w1_ptr, se_b1_ptr, j, offs_h, hmask, H: tl.constexpr):
    """e1_j = se_w1[j] . hbar + se_b1[j] for every row of the (rows, BLOCK_H) tile hbar, and se_w1[j] (BLOCK_H,)."""
    w1_row = tl.load(se_w1_ptr + j * H + offs_h, mask=hmask, other=0.0).to(tl.float32)
    return tl.sum(hbar * w1_row[None, :], axis=1) + tl.load(se_b1_ptr + j).to(tl.float32), w1_row


@triton.jit
def _head_weights(hbar, se_w1_ptr, se_b1_ptr, se_w2_ptr, se_b2_ptr, offs_h, hmask,
                  H: tl.constexpr, HH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """SE branch on a (BLOCK_M, BLOCK_H) tile of head means: w = sigmoid(se_w2 GELU(se_w1 hbar + se_b1) + se_b2),
    zero in the padded heads. H // 2 hidden units, unrolled (H <= 16)."""
    se_b2 = tl.load(se_b2_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    e2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32) + se_b2[None, :]
    for j in tl.static_range(HH):
        e1, _ = _se_hidden(hbar, se_w1_ptr, se_b1_ptr, j, offs_h, hmask, H)
        w2_col = tl.load(se_w2_ptr + offs_h * HH + j, mask=hmask, other=0.0).to(tl.float32)
        e2 += _gelu(e1)[:, None] * w2_col[None, :]
    return tl.where(hmask[None, :], tl.sigmoid(e2), 0.0)


@triton.jit
def _weight_total(w_img, M, BLOCK_M: tl.constexpr):
    """sum_i m_i of one image, in a fixed order (every program of the image gets bitwise the same value)."""
    offs = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r in range(0, M, BLOCK_M):
        acc += tl.load(w_img + r + offs, mask=r + offs < M, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _mlp_weights(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, D: tl.constexpr, BLOCK_D2: tl.constexpr,
                 BLOCK_D4: tl.constexpr):
    """The score MLP's weights as the combine kernels use them, zero-padded: W1's local half as a (k, n) tile,
    its global half as (n, k), b1, W2 as (q, k), b2, W3's two rows and b3's two values."""
    D2: tl.constexpr = D // 2
    D4: tl.constexpr = D // 4
    offs_a = tl.arange(0, BLOCK_D2)
    offs_q = tl.arange(0, BLOCK_D4)
    amask = offs_a < D2
    qmask = offs_q < D4
    aa = amask[:, None] & amask[None, :]
    w1_loc_kn = tl.load(w1_ptr + offs_a[None, :] * D + offs_a[:, None], mask=aa, other=0.0).to(tl.float32)
    w1_glob = tl.load(w1_ptr + offs_a[:, None] * D + D2 + offs_a[None, :], mask=aa, other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + offs_a, mask=amask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + offs_q[:, None] * D2 + offs_a[None, :], mask=qmask[:, None] & amask[None, :],
                 other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
    w30 = tl.load(w3_ptr + offs_q, mask=qmask, other=0.0).to(tl.float32)
    w31 = tl.load(w3_ptr + D4 + offs_q, mask=qmask, other=0.0).to(tl.float32)
    b30 = tl.load(b3_ptr).to(tl.float32)
    b31 = tl.load(b3_ptr + 1).to(tl.float32)
    return w1_loc_kn, w1_glob, b1, w2, b2, w30, w31, b30, b31


@triton.jit
def _head_logits(u, g, w1_loc_kn, w1_glob, b1, w2, b2, w30, w31, b30, b31,
                 PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
    """The score MLP of one head on a tile: u (BLOCK_M, BLOCK_D2) the local half, g (BLOCK_D2,) the global mean
    (a bias of the first layer) -> (p1, h1, p2, h2, l0, l1)."""
    bias1 = tl.sum(w1_glob * g[None, :], axis=1) + b1
    p1 = _mm(u, w1_loc_kn, PRECISION, EMULATE_TF32) + bias1[None, :]
    h1 = _gelu(p1)
    p2 = _mm(h1, tl.trans(w2), PRECISION, EMULATE_TF32) + b2[None, :]
    h2 = _gelu(p2)
    l0 = tl.sum(h2 * w30[None, :], axis=1) + b30
    l1 = tl.sum(h2 * w31[None, :], axis=1) + b31
    return p1, h1, p2, h2, l0, l1


@triton.jit
def _log_softmax2(l0, l1):
    top = tl.maximum(l0, l1)
    lse = top + tl.log(tl.exp(l0 - top) + tl.exp(l1 - top))
    return l0 - lse, l1 - lse


@triton.jit
def _head_params(LNW, LNB, BIN, offs_d, dmask):
    """The per-head kernels' shared vectors: LayerNorm weight and bias, proj_in's bias (masked to d, float32)."""
    lnw = tl.load(LNW + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(LNB + offs_d, mask=dmask, other=0.0).to(tl.float32)
    b_in = tl.load(BIN + offs_d, mask=dmask, other=0.0).to(tl.float32)
    return lnw, lnb, b_in


@triton.jit
def _load_x_tile(x_img, rows, row_hi, stride_sm, offs_d, dmask):
    """Rows `rows` (< row_hi) of one image's head slice as float32 (BLOCK_M, BLOCK_D), with the row and tile masks."""
    rmask = rows < row_hi
    xmask = rmask[:, None] & dmask[None, :]
    x = tl.load(x_img + rows[:, None] * stride_sm + offs_d[None, :], mask=xmask, other=0.0).to(tl.float32)
    return x, rmask, xmask


@triton.jit(do_not_specialize=["M", "rows_per_chunk", "n_chunks"])
def _fwd_head_kernel(S, stride_sb, stride_sm, WTS, LNW, LNB, WIN, BIN, ULOC, MEAN, RSTD, GPART,
                     M, H, rows_per_chunk, n_chunks,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    D2: tl.constexpr = D // 2
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    lnw, lnb, b_in = _head_params(LNW, LNB, BIN, offs_d, dmask)
    # W_in^T as a (k, n) tile: one dot gives both halves of u.
    w_in_kn = tl.load(WIN + offs_d[None, :] * D + offs_d[:, None], mask=dmask[:, None] & dmask[None, :],
                      other=0.0).to(tl.float32)
    x_img = S + b * stride_sb + h * D
    w_img = WTS + b * M
    stat_img = b * M * H + h
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_lo = chunk * rows_per_chunk
    row_hi = tl.minimum(row_lo + rows_per_chunk, M)
    for r in range(row_lo, row_hi, BLOCK_M):
        rows = r + offs_m
        x, rmask, _ = _load_x_tile(x_img, rows, row_hi, stride_sm, offs_d, dmask)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(dmask[None, :], x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + 1e-5)
        ln = xc * rstd[:, None] * lnw[None, :] + lnb[None, :]
        u = _gelu(_mm(ln, w_in_kn, PRECISION, EMULATE_TF32) + b_in[None, :])
        tl.store(ULOC + ((b * M + rows[:, None]) * H + h) * D2 + offs_d[None, :], u,
                 mask=rmask[:, None] & (offs_d[None, :] < D2))
        m = tl.load(w_img + rows, mask=rmask, other=0.0)
        acc += tl.sum(u * m[:, None], axis=0)  # padded rows have m = 0 (and a finite u: x = 0 there)
        tl.store(MEAN + stat_img + rows * H, mean, mask=rmask)
        tl.store(RSTD + stat_img + rows * H, rstd, mask=rmask)
    # partial numerator of the global half: (B, n_chunks, H, D2)
    gmask = (offs_d >= D2) & dmask
    tl.store(GPART + ((b * n_chunks + chunk) * H + h) * D2 + offs_d - D2, acc, mask=gmask)


@triton.jit(do_not_specialize=["M", "n_chunks"])
def _fwd_combine_kernel(WTS, ULOC, MEAN, GPART, GLOB, SCORE, PROB, M, n_chunks, tiny,
                        W1, B1, W2, B2, W3, B3, SE_W1, SE_B1, SE_W2, SE_B2,
                        D: tl.constexpr, H: tl.constexpr, HH: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D2: tl.constexpr, BLOCK_D4: tl.constexpr, BLOCK_H: tl.constexpr,
                        PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    D2: tl.constexpr = D // 2
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_a = tl.arange(0, BLOCK_D2)
    amask = offs_a < D2
    total = _weight_total(WTS + b * M, M, BLOCK_M)
    inv_t = 1.0 / tl.maximum(total, tiny)
    hbar = tl.load(MEAN + (b * M + rows[:, None]) * H + offs_h[None, :], mask=rmask[:, None] & hmask[None, :],
                   other=0.0)
    w = _head_weights(hbar, SE_W1, SE_B1, SE_W2, SE_B2, offs_h, hmask, H, HH, BLOCK_M, BLOCK_H)
    wsum = tl.sum(w, axis=1)
    w1_loc_kn, w1_glob, b1, w2, b2, w30, w31, b30, b31 = _mlp_weights(W1, B1, W2, B2, W3, B3, D, BLOCK_D2,
                                                                      BLOCK_D4)
    s0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    q0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    q1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h in range(H):
        g = tl.zeros([BLOCK_D2], dtype=tl.float32)
        for c in range(n_chunks):  # the chunks' partials, in order
            g += tl.load(GPART + ((b * n_chunks + c) * H + h) * D2 + offs_a, mask=amask, other=0.0)
        g = g * inv_t
        if tile == 0:
            tl.store(GLOB + (b * H + h) * D2 + offs_a, g, mask=amask)
        u = tl.load(ULOC + ((b * M + rows[:, None]) * H + h) * D2 + offs_a[None, :],
                    mask=rmask[:, None] & amask[None, :], other=0.0)
        _, _, _, _, l0, l1 = _head_logits(u, g, w1_loc_kn, w1_glob, b1, w2, b2, w30, w31, b30, b31,
                                          PRECISION, EMULATE_TF32)
        ls0, ls1 = _log_softmax2(l0, l1)
        wh = tl.sum(tl.where(offs_h[None, :] == h, w, 0.0), axis=1)
        s0 += wh * ls0
        s1 += wh * ls1
        q0 += wh * tl.exp(ls0)
        q1 += wh * tl.exp(ls1)
    out = (b * M + rows) * 2
    tl.store(SCORE + out, s0 / wsum, mask=rmask)
    tl.store(SCORE + out + 1, s1 / wsum, mask=rmask)
    tl.store(PROB + out, q0 / wsum, mask=rmask)
    tl.store(PROB + out + 1, q1 / wsum, mask=rmask)


@triton.jit(do_not_specialize=["M", "n_tiles"])
def _bwd_combine_kernel(DSCORE, DPROB, SCORE, PROB, ULOC, MEAN, GLOB,
                        W1, B1, W2, B2, W3, B3, SE_W1, SE_B1, SE_W2, SE_B2,
                        DULOC, DGPART, DHBAR,
                        DW1_P, DB1_P, DW2_P, DB2_P, DW3_P, DB3_P, DSW1_P, DSB1_P, DSW2_P, DSB2_P, M, n_tiles,
                        D: tl.constexpr, H: tl.constexpr, HH: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D2: tl.constexpr, BLOCK_D4: tl.constexpr, BLOCK_H: tl.constexpr,
                        PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    part = b * n_tiles + tile  # this program's slot in the partial buffers
    D2: tl.constexpr = D // 2
    D4: tl.constexpr = D // 4
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_a = tl.arange(0, BLOCK_D2)
    amask = offs_a < D2
    offs_q = tl.arange(0, BLOCK_D4)
    qmask = offs_q < D4
    rh_mask = rmask[:, None] & hmask[None, :]
    hbar = tl.load(MEAN + (b * M + rows[:, None]) * H + offs_h[None, :], mask=rh_mask, other=0.0)
    w = _head_weights(hbar, SE_W1, SE_B1, SE_W2, SE_B2, offs_h, hmask, H, HH, BLOCK_M, BLOCK_H)
    wsum = tl.where(rmask, tl.sum(w, axis=1), 1.0)
    out = (b * M + rows) * 2
    # dscore / dprob are 0 in the padded rows: every gradient below vanishes there.
    ds0 = tl.load(DSCORE + out, mask=rmask, other=0.0) / wsum
    ds1 = tl.load(DSCORE + out + 1, mask=rmask, other=0.0) / wsum
    dq0 = tl.load(DPROB + out, mask=rmask, other=0.0) / wsum
    dq1 = tl.load(DPROB + out + 1, mask=rmask, other=0.0) / wsum
    # (score . dscore + prob . dprob) / W: the part of d w_h common to every head
    base = (tl.load(SCORE + out, mask=rmask, other=0.0) * ds0 + tl.load(SCORE + out + 1, mask=rmask, other=0.0)
            * ds1 + tl.load(PROB + out, mask=rmask, other=0.0) * dq0
            + tl.load(PROB + out + 1, mask=rmask, other=0.0) * dq1)
    w1_loc_kn, w1_glob, b1, w2, b2, w30, w31, b30, b31 = _mlp_weights(W1, B1, W2, B2, W3, B3, D, BLOCK_D2,
                                                                      BLOCK_D4)
    dw = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dw1_loc = tl.zeros([BLOCK_D2, BLOCK_D2], dtype=tl.float32)   # (n, k)
    dw1_glob = tl.zeros([BLOCK_D2, BLOCK_D2], dtype=tl.float32)  # (n, k)
    db1 = tl.zeros([BLOCK_D2], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D4, BLOCK_D2], dtype=tl.float32)       # (q, k)
    db2 = tl.zeros([BLOCK_D4], dtype=tl.float32)
    dw30 = tl.zeros([BLOCK_D4], dtype=tl.float32)
    dw31 = tl.zeros([BLOCK_D4], dtype=tl.float32)
    db30 = tl.zeros([BLOCK_M], dtype=tl.float32)
    db31 = tl.zeros([BLOCK_M], dtype=tl.float32)
    ua_mask = rmask[:, None] & amask[None, :]
    for h in range(H):
        g = tl.load(GLOB + (b * H + h) * D2 + offs_a, mask=amask, other=0.0)
        u_off = ((b * M + rows[:, None]) * H + h) * D2 + offs_a[None, :]
        u = tl.load(ULOC + u_off, mask=ua_mask, other=0.0)
        p1, h1, p2, h2, l0, l1 = _head_logits(u, g, w1_loc_kn, w1_glob, b1, w2, b2, w30, w31, b30, b31,
                                              PRECISION, EMULATE_TF32)
        ls0, ls1 = _log_softmax2(l0, l1)
        sm0 = tl.exp(ls0)
        sm1 = tl.exp(ls1)
        # d w_h = (ls_h . dscore + sm_h . dprob - score . dscore - prob . dprob) / W
        dw += tl.where(offs_h[None, :] == h, (ls0 * ds0 + ls1 * ds1 + sm0 * dq0 + sm1 * dq1 - base)[:, None], 0.0)
        wh = tl.sum(tl.where(offs_h[None, :] == h, w, 0.0), axis=1)
        # dls = w_h / W dscore, dsm = w_h / W dprob -> dl = dls - sm sum(dls) + sm (dsm - sm . dsm)
        dls0 = wh * ds0
        dls1 = wh * ds1
        dsm0 = wh * dq0
        dsm1 = wh * dq1
        c_sm = dls0 + dls1 + sm0 * dsm0 + sm1 * dsm1
        dl0 = dls0 + sm0 * (dsm0 - c_sm)
        dl1 = dls1 + sm1 * (dsm1 - c_sm)
        dw30 += tl.sum(dl0[:, None] * h2, axis=0)
        dw31 += tl.sum(dl1[:, None] * h2, axis=0)
        db30 += dl0
        db31 += dl1
        _, gp2 = _gelu_and_grad(p2)
        dp2 = (dl0[:, None] * w30[None, :] + dl1[:, None] * w31[None, :]) * gp2
        dw2 += _mm(tl.trans(dp2), h1, PRECISION, EMULATE_TF32)
        db2 += tl.sum(dp2, axis=0)
        _, gp1 = _gelu_and_grad(p1)
        dp1 = _mm(dp2, w2, PRECISION, EMULATE_TF32) * gp1
        dw1_loc += _mm(tl.trans(dp1), u, PRECISION, EMULATE_TF32)
        sdp1 = tl.sum(dp1, axis=0)  # (n,): W1's global half sees the same glob in every row
        dw1_glob += sdp1[:, None] * g[None, :]
        db1 += sdp1
        tl.store(DULOC + u_off, _mm(dp1, tl.trans(w1_loc_kn), PRECISION, EMULATE_TF32), mask=ua_mask)
        tl.store(DGPART + (part * H + h) * D2 + offs_a, tl.sum(w1_glob * sdp1[:, None], axis=0), mask=amask)
    # SE branch backward: de2 = dw w (1 - w), e2 = se_w2 g1 + se_b2, g1 = GELU(e1), e1 = se_w1 hbar + se_b1.
    de2 = tl.where(rh_mask, dw * w * (1.0 - w), 0.0)
    tl.store(DSB2_P + part * H + offs_h, tl.sum(de2, axis=0), mask=hmask)
    dhbar = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(HH):
        e1, w1_row = _se_hidden(hbar, SE_W1, SE_B1, j, offs_h, hmask, H)
        g1, gg1 = _gelu_and_grad(e1)
        w2_col = tl.load(SE_W2 + offs_h * HH + j, mask=hmask, other=0.0).to(tl.float32)
        tl.store(DSW2_P + (part * H + offs_h) * HH + j, tl.sum(de2 * g1[:, None], axis=0), mask=hmask)
        de1 = tl.sum(de2 * w2_col[None, :], axis=1) * gg1
        tl.store(DSB1_P + part * HH + j, tl.sum(de1, axis=0))
        tl.store(DSW1_P + (part * HH + j) * H + offs_h, tl.sum(de1[:, None] * hbar, axis=0), mask=hmask)
        dhbar += de1[:, None] * w1_row[None, :]
    tl.store(DHBAR + (b * M + rows[:, None]) * H + offs_h[None, :], dhbar, mask=rh_mask)
    # this tile's partials of the score MLP's weight gradients
    aa = amask[:, None] & amask[None, :]
    w1_part = DW1_P + part * D2 * D + offs_a[:, None] * D + offs_a[None, :]
    tl.store(w1_part, dw1_loc, mask=aa)
    tl.store(w1_part + D2, dw1_glob, mask=aa)
    tl.store(DB1_P + part * D2 + offs_a, db1, mask=amask)
    tl.store(DW2_P + part * D4 * D2 + offs_q[:, None] * D2 + offs_a[None, :], dw2,
             mask=qmask[:, None] & amask[None, :])
    tl.store(DB2_P + part * D4 + offs_q, db2, mask=qmask)
    tl.store(DW3_P + part * 2 * D4 + offs_q, dw30, mask=qmask)
    tl.store(DW3_P + part * 2 * D4 + D4 + offs_q, dw31, mask=qmask)
    tl.store(DB3_P + part * 2, tl.sum(db30, axis=0))
    tl.store(DB3_P + part * 2 + 1, tl.sum(db31, axis=0))


@triton.jit(do_not_specialize=["M", "rows_per_chunk", "n_chunks", "n_tiles"])
def _bwd_head_kernel(S, stride_sb, stride_sm, WTS, LNW, LNB, WIN, BIN, MEAN, RSTD, GLOB, DULOC, DGPART, DHBAR,
                     DS, stride_db, stride_dm, DM, DWIN_P, DBIN_P, DLNW_P, DLNB_P, DA, LNOUT,
                     M, H, rows_per_chunk, n_chunks, n_tiles, tiny,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DW_IN_TILE: tl.constexpr,
                     PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    part = bh.to(tl.int64) * n_chunks + chunk
    D2: tl.constexpr = D // 2
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    loc = offs_d < D2
    gmask = (offs_d >= D2) & dmask
    lnw, lnb, b_in = _head_params(LNW, LNB, BIN, offs_d, dmask)
    w_in = tl.load(WIN + offs_d[:, None] * D + offs_d[None, :], mask=dmask[:, None] & dmask[None, :],
                   other=0.0).to(tl.float32)  # (n, k)
    # dglob of this (image, head), at the global half's columns of a BLOCK_D vector: the combine tiles' partials
    dglob = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(n_tiles):
        dglob += tl.load(DGPART + ((b * n_tiles + t) * H + h) * D2 + offs_d - D2, mask=gmask, other=0.0)
    glob = tl.load(GLOB + (b * H + h) * D2 + offs_d - D2, mask=gmask, other=0.0)
    total = _weight_total(WTS + b * M, M, BLOCK_M)
    inv_t = 1.0 / tl.maximum(total, tiny)
    # glob = numerator / T: where T is not clamped, dT = dm flows too (-glob . dglob / T per unit of m_i).
    glob_t = tl.where(total >= tiny, glob, 0.0)
    x_img = S + b * stride_sb + h * D
    dx_img = DS + b * stride_db + h * D
    stat_img = b * M * H + h
    # DW_IN_TILE: dW_in's partial accumulates here; otherwise (wide heads) da and ln go to DA / LNOUT, rows
    # (b, m, h) of a (B * M * H, D) matrix each, for one GEMM after the kernel.
    dw_in = tl.zeros([BLOCK_D if DW_IN_TILE else 16, BLOCK_D if DW_IN_TILE else 16], dtype=tl.float32)  # (n, k)
    db_in = tl.zeros([BLOCK_D], dtype=tl.float32)
    dlnw = tl.zeros([BLOCK_D], dtype=tl.float32)
    dlnb = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_lo = chunk * rows_per_chunk
    row_hi = tl.minimum(row_lo + rows_per_chunk, M)
    for r in range(row_lo, row_hi, BLOCK_M):
        rows = r + offs_m
        x, rmask, xmask = _load_x_tile(x_img, rows, row_hi, stride_sm, offs_d, dmask)
        mean = tl.load(MEAN + stat_img + rows * H, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + stat_img + rows * H, mask=rmask, other=0.0)
        xhat = tl.where(xmask, (x - mean[:, None]) * rstd[:, None], 0.0)
        ln = xhat * lnw[None, :] + lnb[None, :]
        u, gu = _gelu_and_grad(_mm(ln, tl.trans(w_in), PRECISION, EMULATE_TF32) + b_in[None, :])
        m = tl.load(WTS + b * M + rows, mask=rmask, other=0.0)
        du_loc = tl.load(DULOC + ((b * M + rows[:, None]) * H + h) * D2 + offs_d[None, :],
                         mask=rmask[:, None] & loc[None, :], other=0.0)
        du = tl.where(loc[None, :], du_loc, (m * inv_t)[:, None] * dglob[None, :])
        dm = tl.sum(tl.where(gmask[None, :], (u - glob_t[None, :]) * dglob[None, :], 0.0), axis=1) * inv_t
        tl.store(DM + stat_img + rows * H, dm, mask=rmask)
        da = tl.where(xmask, du * gu, 0.0)
        if DW_IN_TILE:
            dw_in += _mm(tl.trans(da), ln, PRECISION, EMULATE_TF32)
        else:
            da_off = ((b * M + rows[:, None]) * H + h) * D + offs_d[None, :]
            tl.store(DA + da_off, da, mask=xmask)
            tl.store(LNOUT + da_off, ln, mask=xmask)
        db_in += tl.sum(da, axis=0)
        dln = _mm(da, w_in, PRECISION, EMULATE_TF32)
        dlnw += tl.sum(dln * xhat, axis=0)
        dlnb += tl.sum(dln, axis=0)
        dxhat = dln * lnw[None, :]
        c1 = tl.sum(dxhat, axis=1) / D
        c2 = tl.sum(dxhat * xhat, axis=1) / D
        dhbar = tl.load(DHBAR + stat_img + rows * H, mask=rmask, other=0.0)
        dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None]) + (dhbar / D)[:, None]
        tl.store(dx_img + rows[:, None] * stride_dm + offs_d[None, :], dx.to(DS.dtype.element_ty), mask=xmask)
    dd = dmask[:, None] & dmask[None, :]
    if DW_IN_TILE:
        tl.store(DWIN_P + part * D * D + offs_d[:, None] * D + offs_d[None, :], dw_in, mask=dd)
    tl.store(DBIN_P + part * D + offs_d, db_in, mask=dmask)
    tl.store(DLNW_P + part * D + offs_d, dlnw, mask=dmask)
    tl.store(DLNB_P + part * D + offs_d, dlnb, mask=dmask)


# --- launchers ---------------------------------------------------------------------------------------------
# Row counts are not specialised (do_not_specialize above): a model compiles each kernel once per (C, H, dtype,
# tile size), not once per stage's row count, times Triton's alignment specialisation of pointers and strides.

def _pow2(n, minimum=16):
    return max(minimum, triton.next_power_of_2(n))


# Enough programs per launch to fill a GPU (~132 SMs, several resident programs each) before the row chunks
# of one (image, head) get split further: fewer chunks mean fewer partials to sum.
TARGET_PROGRAMS = 1024


def block_m(M):
    """Rows per tile: 16 (tl.dot's smallest M) for short images, else 32."""
    return 16 if M <= 16 else 32


def row_chunks(M, programs_per_chunk, bm):
    """(rows per chunk, number of chunks) for the per-(image, head) kernels: each chunk is a whole number of tiles."""
    tiles = triton.cdiv(max(M, 1), bm)
    chunks = min(tiles, max(1, triton.cdiv(TARGET_PROGRAMS, max(programs_per_chunk, 1))))
    per = triton.cdiv(tiles, chunks) * bm
    return per, triton.cdiv(max(M, 1), per)


def dot_precision(dtype):
    """tl.dot's input precision. Every dot operand here is a float32 intermediate (LayerNorm output, u, MLP
    activations and their gradients; S itself never enters a dot): 16-bit S use TF32 tensor cores (10-bit
    mantissas, 8x finer than bfloat16 operands), float32 S exact float32 unless torch allows TF32."""
    return "tf32" if dtype != torch.float32 else _dot_precision(dtype)


def launch_meta(channels, num_heads, dtype, seqlen, *, interpret=False, arch=90):
    """{kernel name: dict(constexprs, num_warps)} of the four kernels for (C, H, S's dtype, M) on sm_<arch>: what
    a launch compiles (interpret: under TRITON_INTERPRET=1), also used by spvit_kernels.kernel_report."""
    d = channels // num_heads
    precision = dot_precision(dtype)
    common = dict(D=d, BLOCK_M=block_m(seqlen), PRECISION=precision, EMULATE_TF32=interpret and precision == "tf32")
    head = dict(common, BLOCK_D=_pow2(d))
    combine = dict(common, H=num_heads, HH=num_heads // 2, BLOCK_D2=_pow2(d // 2), BLOCK_D4=_pow2(d // 4),
                   BLOCK_H=_pow2(num_heads, 2))
    # Warps and tiles: the fewest warps without spills on sm_80 and sm_90 for the DeiT widths (d = 64, H = 3, 6,
    # 12; benchmarks/kernel_report.py). The backward kernels hold float32 accumulators (dW_in (d, d); dW1, dW2)
    # and many live tiles: 8 warps and 16-row tiles (32 rows spill: the combine's for H = 3 and 12 with 16-bit S,
    # the per-(image, head) one on sm_90 for float32). Above d = 64 the (d, d) tiles quadruple: the per-(image,
    # head) kernels take 16 warps (the forward spills with 8 for float32), and the backward leaves dW_in to one
    # GEMM after it (DW_IN_TILE False: it writes da and ln, 8 bytes per row and channel): a (d, d) float32
    # accumulator beside W_in in both dot layouts spilled 12-532 bytes within the 128 registers per thread of 512
    # threads. The float32 backward combine there: 8 warps on sm_90 (171-183 registers for d = 80-128, H = 2-16),
    # 16 on sm_80 for H > 2 (8 spilled 8-16 bytes at some H; 16 spilled 24 at H = 2, where 8 do not).
    wide = head["BLOCK_D"] > 64
    comb_warps = 16 if wide and dtype == torch.float32 and arch < 90 and num_heads > 2 else 8
    return {"_fwd_head_kernel": dict(constexprs=head, num_warps=16 if wide else 4),
            "_fwd_combine_kernel": dict(constexprs=combine, num_warps=8),
            "_bwd_combine_kernel": dict(constexprs=dict(combine, BLOCK_M=16), num_warps=comb_warps),
            "_bwd_head_kernel": dict(constexprs=dict(head, BLOCK_M=16, DW_IN_TILE=not wide),
                                     num_warps=16 if wide else 8)}


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _arch(t):
    """sm_<arch> of t's GPU as an int (90 off the GPU: the interpreter ignores warps)."""
    if not t.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _check_head_dim(S, num_heads):
    d = S.shape[2] // num_heads
    if d not in SELECTOR_TRAIN_TRITON_HEAD_DIMS:
        raise ValueError(f"num_heads: the Triton backend takes head dims C / num_heads <= "
                         f"{SELECTOR_TRAIN_TRITON_HEAD_DIMS[-1]}, got {d}")


def _rows_view(S):
    return S if S.stride(2) == 1 else S.contiguous()


def selector_train_fwd_triton(S, weights, num_heads, *params):
    """Backend entry (arguments validated; weights (B, M) float32 contiguous). See the module docstring."""
    _check_head_dim(S, num_heads)
    S = _rows_view(S)
    B, M, C = S.shape
    H = num_heads
    d = C // H
    d2 = d // 2
    dev, f32 = S.device, torch.float32
    score = torch.empty((B, M, 2), dtype=f32, device=dev)
    prob = torch.empty((B, M, 2), dtype=f32, device=dev)
    u_loc = torch.empty((B, M, H, d2), dtype=f32, device=dev)
    glob = torch.zeros((B, H, d2), dtype=f32, device=dev)  # M = 0: no tile writes it
    mean = torch.empty((B, M, H), dtype=f32, device=dev)
    rstd = torch.empty((B, M, H), dtype=f32, device=dev)
    if B * M == 0:
        return score, prob, u_loc, glob, mean, rstd
    metas = launch_meta(C, H, S.dtype, M, interpret=dev.type == "cpu", arch=_arch(S))
    head, comb = metas["_fwd_head_kernel"], metas["_fwd_combine_kernel"]
    per, n_chunks = row_chunks(M, B * H, head["constexprs"]["BLOCK_M"])
    gpart = torch.empty((B, n_chunks, H, d2), dtype=f32, device=dev)
    lnw, lnb, w_in, b_in, w1, b1, w2, b2, w3, b3, sw1, sb1, sw2, sb2 = (p.contiguous() for p in params)
    with _device(S):
        _fwd_head_kernel[(n_chunks, B * H)](
            S, S.stride(0), S.stride(1), weights, lnw, lnb, w_in, b_in, u_loc, mean, rstd, gpart, M, H, per,
            n_chunks, **head["constexprs"], num_warps=head["num_warps"])
        _fwd_combine_kernel[(triton.cdiv(M, comb["constexprs"]["BLOCK_M"]), B)](
            weights, u_loc, mean, gpart, glob, score, prob, M, n_chunks, _TINY, w1, b1, w2, b2, w3, b3,
            sw1, sb1, sw2, sb2, **comb["constexprs"], num_warps=comb["num_warps"])
    return score, prob, u_loc, glob, mean, rstd


def selector_train_bwd_triton(dscore, dprob, S, weights, num_heads, *rest):
    """Backend entry: (dS in S's dtype, dweights (B, M) float32, the 14 weight gradients each in its weight's
    dtype). rest = the 14 weights, then the forward's score, prob, u_loc, glob, mean, rstd."""
    _check_head_dim(S, num_heads)
    S = _rows_view(S)
    params, (score, prob, u_loc, glob, mean, rstd) = rest[:14], rest[14:]
    B, M, C = S.shape
    H = num_heads
    d = C // H
    d2, d4, hh = d // 2, d // 4, H // 2
    dev, f32 = S.device, torch.float32
    if B * M == 0:  # no rows: every gradient is an empty or zero sum
        return (torch.zeros_like(S), torch.zeros_like(weights), *(torch.zeros_like(p) for p in params))
    dS = torch.empty((B, M, C), dtype=S.dtype, device=dev)
    metas = launch_meta(C, H, S.dtype, M, interpret=dev.type == "cpu", arch=_arch(S))
    head, comb = metas["_bwd_head_kernel"], metas["_bwd_combine_kernel"]
    n_tiles = triton.cdiv(M, comb["constexprs"]["BLOCK_M"])
    per, n_chunks = row_chunks(M, B * H, head["constexprs"]["BLOCK_M"])
    P1, P2 = B * n_tiles, B * H * n_chunks
    e = lambda *shape: torch.empty(shape, dtype=f32, device=dev)  # noqa: E731
    du_loc, dgpart, dhbar, dm = e(B, M, H, d2), e(B, n_tiles, H, d2), e(B, M, H), e(B, M, H)
    comb_parts = [e(P1, d2, d), e(P1, d2), e(P1, d4, d2), e(P1, d4), e(P1, 2, d4), e(P1, 2), e(P1, hh, H),
                  e(P1, hh), e(P1, H, hh), e(P1, H)]
    tile_dw_in = head["constexprs"]["DW_IN_TILE"]
    head_parts = [e(P2, d, d) if tile_dw_in else e(0, d, d), e(P2, d), e(P2, d), e(P2, d)]
    da, ln = (e(0), e(0)) if tile_dw_in else (e(B * M * H, d), e(B * M * H, d))
    lnw, lnb, w_in, b_in, w1, b1, w2, b2, w3, b3, sw1, sb1, sw2, sb2 = (p.contiguous() for p in params)
    with _device(S):
        _bwd_combine_kernel[(n_tiles, B)](
            dscore, dprob, score, prob, u_loc, mean, glob, w1, b1, w2, b2, w3, b3, sw1, sb1, sw2, sb2,
            du_loc, dgpart, dhbar, *comb_parts, M, n_tiles, **comb["constexprs"], num_warps=comb["num_warps"])
        _bwd_head_kernel[(n_chunks, B * H)](
            S, S.stride(0), S.stride(1), weights, lnw, lnb, w_in, b_in, mean, rstd, glob, du_loc, dgpart, dhbar,
            dS, dS.stride(0), dS.stride(1), dm, *head_parts, da, ln, M, H, per, n_chunks, n_tiles, _TINY,
            **head["constexprs"], num_warps=head["num_warps"])
    # The weight gradients: per-program partials summed here (a fixed-order reduction, no atomics).
    dw_in, db_in, dlnw, dlnb = (t.sum(0) for t in head_parts)
    if not tile_dw_in:  # (n, k) = the sum over rows (b, m, h) of da_n ln_k
        dw_in = da.t() @ ln
    dw1, db1, dw2, db2, dw3, db3, dsw1, dsb1, dsw2, dsb2 = (t.sum(0) for t in comb_parts)
    grads = (dlnw, dlnb, dw_in, db_in, dw1, db1, dw2, db2, dw3, db3, dsw1, dsb1, dsw2, dsb2)
    return (dS, dm.sum(-1).to(weights.dtype), *(g.to(p.dtype) for g, p in zip(grads, params)))


__all__ = ["launch_meta", "selector_train_bwd_triton", "selector_train_fwd_triton"]
