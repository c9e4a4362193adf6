"""Triton forward and backward of the fused residual add + LayerNorm (torch.ops.spvit.add_layer_norm_{fwd,bwd}).

    s, y, mean, rstd = add_layer_norm_fwd_triton(x, branch, weight, bias, eps, out_dtype, branch_scale=None)
    dx, dbranch, dweight, dbias = add_layer_norm_bwd_triton(dy, dsum, s, weight, bias, mean, rstd, x_dtype,
                                                            branch_dtype, branch_scale=None)

    x, branch: (..., C) contiguous, float32 / float16 / bfloat16 (branch may be None: a plain LayerNorm);
    s = x + branch in their promoted dtype ((0,) when branch is None), y in out_dtype (default s's dtype),
    mean, rstd (rows,) float32; branch_scale None or (rows,) float32 contiguous: s = x + branch * branch_scale
    (stochastic depth's per-image factor; the product rounded to branch's dtype, as PyTorch's multiply in that
    dtype), whose backward scales dbranch the same way. The formulas: spvit_kernels/reference/add_layer_norm.py.

Why fuse: per token, PyTorch's `x = x + branch; h = norm(x)` under bf16 autocast reads and writes the float32
residual stream three times (the add, the float32 LayerNorm, the cast of its output to bf16 for the next GEMM);
forward here reads x and branch once and writes s (float32) and y (bf16) once, 12 instead of 24 bytes per channel.
Backward folds the gradient arriving at s from the residual path (dsum) into the LayerNorm's input gradient and
writes it in x's and branch's dtypes in the same pass: 16 instead of 36 bytes per channel. With branch_scale, the
stochastic-depth multiply of the branch (forward) and of its gradient (backward) happens in the same pass too: two
bf16 passes fewer (4 bytes per channel each).

Forward: one program per tile of BLOCK_R rows x BLOCK_C (>= C) channels, statistics in float32 from registers
(two passes over the tile, not Welford: the row is resident). Backward: a fixed number of programs, each over a
contiguous span of rows, accumulating its partial weight and bias gradients in float32 registers; the (programs, C)
partials are summed by PyTorch afterwards (deterministic: no atomics).
"""

import torch
import triton
import triton.language as tl

from ..reference.add_layer_norm import add_layer_norm_bwd_reference

# Rows x channels held by one program; C above MAX_CHANNELS does not fit a tile (the op's check refuses it).
TILE_ELEMENTS = 4096
TILE_ELEMENTS_BWD = 2048
MAX_CHANNELS = 8192
# Backward programs: enough to fill an H100 (132 SMs) a few times over, few enough that the (programs, C) float32
# partial sums stay a small fraction of the row traffic (512 x C x 4 bytes vs rows x C x 14).
BWD_PROGRAMS = 512


def launch_meta(channels, backward=False):
    """Tile sizes and warps for a C-channel LayerNorm (also used by spvit_kernels.kernel_report)."""
    block_c = triton.next_power_of_2(max(channels, 1))
    block_r = max(1, (TILE_ELEMENTS_BWD if backward else TILE_ELEMENTS) // block_c)
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_r * block_c < 2048 else 8)


@triton.jit
def _add_layer_norm_fwd_kernel(X, BR, W, BI, S, Y, MEAN, RSTD, SCALE, n_rows, C, eps,
                               HAS_BRANCH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        br = tl.load(BR + offs, mask=mask, other=0.0)
        if HAS_SCALE:  # branch * scale in float32, rounded to the branch's dtype as PyTorch's multiply rounds it
            br = (br.to(tl.float32) * tl.load(SCALE + rows, mask=rmask, other=0.0)[:, None]).to(br.dtype)
        s += br.to(tl.float32)
        s = s.to(S.dtype.element_ty)  # the statistics see the stored sum, as add-then-layer_norm does
        tl.store(S + offs, s, mask=mask)
        s = s.to(tl.float32)
    mean = tl.sum(s, axis=1) / C
    xc = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(BI + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _add_layer_norm_bwd_kernel(DY, DSUM, S, W, MEAN, RSTD, DX, DBR, DW, DB, SCALE, n_rows, C, rows_per_prog,
                               HAS_DSUM: tl.constexpr, HAS_W: tl.constexpr, HAS_DBR: tl.constexpr,
                               HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, HAS_SCALE: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    # 2-D accumulators, reduced once at the end: no cross-warp reduction inside the row loop
    dw_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, n_rows)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(xhat * g, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        ds = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DSUM:
            ds += tl.load(DSUM + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
        if HAS_DBR:
            dbr = ds.to(DBR.dtype.element_ty)
            if HAS_SCALE:  # the multiply's gradient: ds in the branch's dtype times the scale, rounded again
                dbr = (dbr.to(tl.float32) * tl.load(SCALE + rows, mask=rmask, other=0.0)[:, None]).to(dbr.dtype)
            tl.store(DBR + offs, dbr, mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    if HAS_DW:
        tl.store(DW + pid * C + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if HAS_DB:
        tl.store(DB + pid * C + cols, tl.sum(db_acc, axis=0), mask=cmask)


def add_layer_norm_fwd_triton(x, branch, weight, bias, eps, out_dtype, branch_scale=None):
    C = x.shape[-1]
    rows = x.numel() // C
    s_dtype = torch.promote_types(x.dtype, branch.dtype) if branch is not None else x.dtype
    s = torch.empty(x.shape, dtype=s_dtype, device=x.device) if branch is not None else x.new_empty((0,))
    y = torch.empty(x.shape, dtype=out_dtype or s_dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows:
        meta = launch_meta(C)
        grid = (triton.cdiv(rows, meta["BLOCK_R"]),)
        _add_layer_norm_fwd_kernel[grid](
            x, branch if branch is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, s if branch is not None else y, y, mean, rstd,
            _scale_rows(branch_scale, mean), rows, C, float(eps),
            HAS_BRANCH=branch is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_SCALE=branch_scale is not None,
            BLOCK_R=meta["BLOCK_R"], BLOCK_C=meta["BLOCK_C"], num_warps=meta["num_warps"])
    return s, y, mean, rstd


def _scale_rows(branch_scale, fallback):
    """branch_scale as the kernels read it, one float32 per row; fallback (any tensor) when there is none."""
    return branch_scale.reshape(-1).to(torch.float32).contiguous() if branch_scale is not None else fallback


def add_layer_norm_bwd_triton(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype, branch_scale=None):
    C = s.shape[-1]
    rows = s.numel() // C
    dev = s.device
    empty = s.new_empty((0,))
    if dy is None:  # only the residual path's gradient: dx = dsum, nothing reaches weight or bias (no kernel)
        return add_layer_norm_bwd_reference(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype,
                                            branch_scale)
    dx = torch.empty(s.shape, dtype=x_dtype, device=dev)
    dbr = torch.empty(s.shape, dtype=branch_dtype, device=dev) if branch_dtype is not None else empty
    if rows == 0:
        return (dx, dbr, torch.zeros_like(weight) if weight is not None else empty,
                torch.zeros_like(bias) if bias is not None else empty)
    meta = launch_meta(C, backward=True)
    block_r = meta["BLOCK_R"]
    programs = min(BWD_PROGRAMS, triton.cdiv(rows, block_r))
    rows_per_prog = triton.cdiv(triton.cdiv(rows, programs), block_r) * block_r
    programs = triton.cdiv(rows, rows_per_prog)
    dw_part = torch.empty(programs, C, dtype=torch.float32, device=dev) if weight is not None else dx
    db_part = torch.empty(programs, C, dtype=torch.float32, device=dev) if bias is not None else dx
    _add_layer_norm_bwd_kernel[(programs,)](
        dy, dsum if dsum is not None else dy, s, weight if weight is not None else dy, mean, rstd, dx,
        dbr if branch_dtype is not None else dx, dw_part, db_part, _scale_rows(branch_scale, mean), rows, C,
        rows_per_prog, HAS_DSUM=dsum is not None, HAS_W=weight is not None, HAS_DBR=branch_dtype is not None,
        HAS_DW=weight is not None, HAS_DB=bias is not None, HAS_SCALE=branch_scale is not None,
        BLOCK_R=block_r, BLOCK_C=meta["BLOCK_C"], num_warps=meta["num_warps"])
    dw = dw_part.sum(dim=0).to(weight.dtype) if weight is not None else empty
    db = db_part.sum(dim=0).to(bias.dtype) if bias is not None else empty
    return dx, dbr, dw, db
