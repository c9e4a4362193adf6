"""Residual add + LayerNorm in PyTorch: the "reference" backend of torch.ops.spvit.add_layer_norm_{fwd,bwd}.

A pre-norm transformer block reads its residual stream twice per branch: `x = x + branch` and then
`h = norm(x)`, in PyTorch two passes plus (under autocast) a third that casts the float32 LayerNorm output to the
GEMM's dtype. The fused op does the three in one pass over the rows:

    s = x + branch                        (branch None: s = x, and no copy of x is written)
    s = x + round(branch * branch_scale)  with a per-row branch_scale (stochastic depth): the product rounded to
                                          branch's dtype, as `branch * mask` in that dtype is
    y = (s - mean) * rstd * weight + bias mean, rstd over the last dim, rstd = 1 / sqrt(var + eps), biased var

Backward, with xhat = (s - mean) * rstd, g = dy * weight (dy alone without weight), over the C channels of a row:

    ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dsum      dsum: the gradient reaching s from elsewhere
    dx = ds (in x's dtype), dbranch = ds (in branch's dtype), dweight = sum_rows dy xhat, dbias = sum_rows dy
    with branch_scale: dbranch = round(round(ds) * branch_scale), each rounding to branch's dtype (the gradient
    of `branch * mask` as autograd forms it from ds cast to the product's dtype)

Statistics and gradients are computed in float32 (float64 for float64 inputs); s is rounded to its dtype
before the statistics, as PyTorch's add followed by layer_norm sees it.
"""

import torch

__all__ = ["add_layer_norm_fwd_reference", "add_layer_norm_bwd_reference", "compute_dtype"]


def compute_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _scaled(t, branch_scale):
    """t * branch_scale per row in the compute dtype (float32; float64 for float64 t), rounded to t's dtype: the
    product PyTorch's 16-bit multiply and the Triton kernels form."""
    acc = compute_dtype(t.dtype)
    return (t.to(acc) * branch_scale.to(acc)[..., None]).to(t.dtype)


def add_layer_norm_fwd_reference(x, branch, weight, bias, eps, out_dtype, branch_scale=None):
    """x (..., C); branch None or x's shape; weight, bias None or (C,); branch_scale None or x.shape[:-1]. -> (s
    (x's shape; (0,) when branch is None), y (x's shape, out_dtype or s's dtype), mean (rows,), rstd (rows,))."""
    if branch is None:
        s, s_out = x, x.new_empty((0,))
    else:
        s = s_out = x + (branch if branch_scale is None else _scaled(branch, branch_scale))
    acc = compute_dtype(s.dtype)
    C = s.shape[-1]
    sf = s.reshape(-1, C).to(acc)
    mean = sf.mean(dim=1)
    xc = sf - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(dim=1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return s_out, y.to(out_dtype or s.dtype).reshape(s.shape), mean, rstd


def add_layer_norm_bwd_reference(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype, branch_scale=None):
    """The gradients of add_layer_norm_fwd. dy (y's shape) or None; dsum (s's shape) or None; s the LayerNorm's
    input (x + branch, or x). -> (dx in x_dtype, dbranch in branch_dtype ((0,) when branch_dtype is None),
    dweight ((0,) without weight), dbias ((0,) without bias))."""
    acc = compute_dtype(s.dtype)
    C = s.shape[-1]
    rows = s.numel() // C if C else 0
    if dy is None:
        ds = torch.zeros(rows, C, dtype=acc, device=s.device)
        dw, db = torch.zeros(C, dtype=acc, device=s.device), torch.zeros(C, dtype=acc, device=s.device)
    else:
        xhat = (s.reshape(-1, C).to(acc) - mean[:, None].to(acc)) * rstd[:, None].to(acc)
        dyf = dy.reshape(-1, C).to(acc)
        g = dyf * weight.to(acc) if weight is not None else dyf
        ds = rstd[:, None].to(acc) * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
        dw, db = (dyf * xhat).sum(dim=0), dyf.sum(dim=0)
    if dsum is not None:
        ds = ds + dsum.reshape(-1, C).to(acc)
    ds = ds.reshape(s.shape)
    empty = s.new_empty((0,))
    # copies where a cast would return ds itself: the op's outputs never alias each other or an input
    if branch_dtype is None:
        dbranch = empty
    elif branch_scale is None:
        dbranch = ds.to(branch_dtype, copy=True)
    else:
        dbranch = _scaled(ds.to(branch_dtype), branch_scale.reshape(s.shape[:-1]))
    return (ds.to(x_dtype, copy=True), dbranch,
            dw.to(weight.dtype) if weight is not None else empty, db.to(bias.dtype) if bias is not None else empty)
