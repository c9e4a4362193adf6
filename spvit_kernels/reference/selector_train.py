"""The selector's training form (`TokenSelector.train_scores`) in PyTorch: the op's "reference" backend and the
written-out backward that the Triton kernels follow.

Per image, row i, head h (d = C / H, d2 = d / 2, m = the (B, M) weights):
    x = S[i, h*d:(h+1)*d], mean / rstd its LayerNorm statistics, xhat = (x - mean) rstd, ln = xhat gamma + beta
    a = ln W_in^T + b_in, u = GELU(a); head mean hbar = mean; w = sigmoid(se2(GELU(se1(hbar))))
    glob[h] = sum_i m_i u[i, h, d2:] / T, T = max(sum_i m_i, tiny)
    z = [u[:d2], glob[h]] -> p1 = W1 z + b1 -> h1 = GELU(p1) -> p2 = W2 h1 + b2 -> h2 = GELU(p2) -> l = W3 h2 + b3
    score = sum_h w_h log_softmax(l_h) / sum_h w_h, prob = the same with softmax.
The backward is the chain rule of exactly this, in the order the kernels take it: the combine (dl, dw), the score
MLP (dW3 .. dW1, dz), the global mean (du[d2:] = m_i / T dglob, dm_i = (u_i[d2:] - glob) . dglob / T, the
second term only where T is not clamped), the first layer and the LayerNorm, and the SE branch (dhbar / d into
every channel of the head). tiny is float32's for float32 compute (float64's for float64), as in train_scores.
"""

import math

import torch
import torch.nn.functional as F

LN_EPS = 1e-5
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _cdt(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gelu_grad(x):
    """d GELU(x) / dx for the exact (erf) GELU: Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + torch.erf(x * 0.5 ** 0.5)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _lin(t, w, b):
    return F.linear(t, w, b)


def forward_math(S, weights, num_heads, params, tiny=None):
    """The forward with every intermediate the backward needs: a dict of tensors in the compute dtype."""
    cdt = _cdt(S)
    lnw, lnb, w_in, b_in, w1, b1, w2, b2, w3, b3, sw1, sb1, sw2, sb2 = (p.to(cdt) for p in params)
    B, M, C = S.shape
    H = num_heads
    d = C // H
    d2 = d // 2
    x = S.to(cdt).view(B, M, H, d)
    mean = x.mean(-1)
    xc = x - mean[..., None]
    rstd = torch.rsqrt((xc * xc).mean(-1) + LN_EPS)
    xhat = xc * rstd[..., None]
    ln = xhat * lnw + lnb
    a = _lin(ln, w_in, b_in)
    u = F.gelu(a)
    e1 = _lin(mean, sw1, sb1)
    g1 = F.gelu(e1)
    w = torch.sigmoid(_lin(g1, sw2, sb2))                               # (B, M, H)
    m = weights.to(cdt)
    total = m.sum(1)                                                     # (B,)
    tiny = torch.finfo(cdt).tiny if tiny is None else tiny
    T = total.clamp(min=tiny)
    glob = torch.einsum("bm,bmhc->bhc", m, u[..., d2:]) / T[:, None, None]
    z = torch.cat([u[..., :d2], glob[:, None].expand(B, M, H, d - d2)], dim=-1)
    p1 = _lin(z, w1, b1)
    h1 = F.gelu(p1)
    p2 = _lin(h1, w2, b2)
    h2 = F.gelu(p2)
    logits = _lin(h2, w3, b3)                                            # (B, M, H, 2)
    ls = F.log_softmax(logits, -1)
    sm = ls.exp()
    wsum = w.sum(-1, keepdim=True)
    score = (w[..., None] * ls).sum(2) / wsum
    prob = (w[..., None] * sm).sum(2) / wsum
    return dict(x=x, mean=mean, rstd=rstd, xhat=xhat, ln=ln, a=a, u=u, e1=e1, g1=g1, w=w, m=m, total=total, T=T,
                tiny=tiny, glob=glob, z=z, p1=p1, h1=h1, p2=p2, h2=h2, ls=ls, sm=sm, wsum=wsum, score=score,
                prob=prob, params=(lnw, lnb, w_in, b_in, w1, b1, w2, b2, w3, b3, sw1, sb1, sw2, sb2))


def backward_math(f, dscore, dprob):
    """-> (dS (B, M, C), dweights (B, M), the 14 weight gradients), all in the compute dtype."""
    lnw, lnb, w_in, b_in, w1, b1, w2, b2, w3, b3, sw1, sb1, sw2, sb2 = f["params"]
    B, M, H, d = f["x"].shape
    d2 = d // 2
    w, wsum, ls, sm = f["w"], f["wsum"], f["ls"], f["sm"]
    ds, dq = dscore[:, :, None, :], dprob[:, :, None, :]                 # (B, M, 1, 2)
    # combine: score = sum_h w_h ls_h / W, prob = sum_h w_h sm_h / W
    dls = (w / wsum)[..., None] * ds
    dsm = (w / wsum)[..., None] * dq
    dw = (((ls * ds).sum(-1) - (f["score"][:, :, None] * ds).sum(-1))
          + ((sm * dq).sum(-1) - (f["prob"][:, :, None] * dq).sum(-1))) / wsum
    dl = dls - sm * dls.sum(-1, keepdim=True) + sm * (dsm - (sm * dsm).sum(-1, keepdim=True))
    # the score MLP
    h2, h1, z = f["h2"], f["h1"], f["z"]
    dw3, db3 = torch.einsum("bmhk,bmhq->kq", dl, h2), dl.sum((0, 1, 2))
    dp2 = (dl @ w3) * gelu_grad(f["p2"])
    dw2, db2 = torch.einsum("bmhq,bmhk->qk", dp2, h1), dp2.sum((0, 1, 2))
    dp1 = (dp2 @ w2) * gelu_grad(f["p1"])
    dw1, db1 = torch.einsum("bmhn,bmhk->nk", dp1, z), dp1.sum((0, 1, 2))
    dz = dp1 @ w1
    # the global mean
    m, T, u, glob = f["m"], f["T"], f["u"], f["glob"]
    dglob = dz[..., d2:].sum(1)                                          # (B, H, d - d2)
    active = (f["total"] >= f["tiny"]).to(u.dtype)                       # T = total, not the clamp: dT flows
    dm = torch.einsum("bmhc,bhc->bm", u[..., d2:] - (active[:, None, None] * glob)[:, None], dglob) / T[:, None]
    du = torch.cat([dz[..., :d2], (m / T[:, None])[:, :, None, None] * dglob[:, None]], dim=-1)
    # first layer and LayerNorm
    da = du * gelu_grad(f["a"])
    dw_in, db_in = torch.einsum("bmhn,bmhk->nk", da, f["ln"]), da.sum((0, 1, 2))
    dln = da @ w_in
    xhat = f["xhat"]
    dlnw, dlnb = (dln * xhat).sum((0, 1, 2)), dln.sum((0, 1, 2))
    dxhat = dln * lnw
    dx = f["rstd"][..., None] * (dxhat - dxhat.mean(-1, keepdim=True)
                                 - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    # SE branch: w = sigmoid(e2), e2 = sw2 GELU(e1) + sb2, e1 = sw1 hbar + sb1, hbar = mean_c x
    de2 = dw * w * (1 - w)
    dsw2, dsb2 = torch.einsum("bmh,bmj->hj", de2, f["g1"]), de2.sum((0, 1))
    de1 = (de2 @ sw2) * gelu_grad(f["e1"])
    dsw1, dsb1 = torch.einsum("bmj,bmh->jh", de1, f["mean"]), de1.sum((0, 1))
    dx = dx + (de1 @ sw1)[..., None] / d
    return (dx.reshape(B, M, H * d), dm, dlnw, dlnb, dw_in, db_in, dw1, db1, dw2, db2, dw3, db3,
            dsw1, dsb1, dsw2, dsb2)


def selector_train_fwd_reference(S, weights, num_heads, *params):
    """The op's reference forward -> (score, prob (B, M, 2), u_loc (B, M, H, d/2), glob (B, H, d/2), mean, rstd
    (B, M, H)), float32 (float64 for float64 S)."""
    f = forward_math(S, weights, num_heads, params)
    d2 = f["x"].shape[-1] // 2
    return f["score"], f["prob"], f["u"][..., :d2].contiguous(), f["glob"], f["mean"], f["rstd"]


def selector_train_bwd_reference(dscore, dprob, S, weights, num_heads, *rest):
    """The op's reference backward: recomputes the forward from S (the saved tensors in `rest[14:]` are not read)
    -> (dS in S's dtype, dweights in weights' dtype, the 14 weight gradients each in its weight's dtype)."""
    params = rest[:14]
    f = forward_math(S, weights, num_heads, params)
    cdt = _cdt(S)
    grads = backward_math(f, dscore.to(cdt), dprob.to(cdt))
    like = (S, weights) + tuple(params)
    return tuple(g.to(t.dtype) for g, t in zip(grads, like))


__all__ = ["backward_math", "forward_math", "gelu_grad", "selector_train_bwd_reference",
           "selector_train_fwd_reference"]
