"""Policy attention (SPViT's training attention) in PyTorch: the math shared by the CPU autograd form and the op's
"reference" backend, and the paper code's literal form (eye matrix) for tests and the paper-form benchmark.

For scaled scores s (B, H, N, N), policy p (B, N), eps >= 0: m_i = max_j s_ij (every key), E_ij = exp(s_ij - m_i),
p~_ij = p_j + (1 - p_j)[i = j], D_i = sum_j E_ij p~_ij + eps, A_ij = (E_ij p~_ij + eps/N) / D_i, out = A v.

p~ differs from p only on the diagonal, so sum_j E_ij p~_ij v_j = sum_j E_ij (p_j v_j) + E_ii (1 - p_i) v_i:
the forward needs one (B, H, N, N) buffer (the scores, turned in place into E / D) and never the eye matrix.
Backward, with the row max a constant (it moves results only through the eps terms), dA = dout v^T,
delta_i = dout_i . out_i, G_ij = (dA_ij - delta_i) E_ij / D_i:
    ds_ij = G_ij p~_ij          dq = scale ds k,  dk = scale ds^T q
    dp_j  = sum_heads sum_{i != j} G_ij
    dv_j  = p_j sum_i (E_ij / D_i) dout_i + (1 - p_j)(E_jj / D_j) dout_j + (eps / N) sum_i dout_i / D_i
Every function here takes (B, H, N, d) tensors in the compute dtype (float32, or float64).
"""

import math

import torch

_LOG2E = 1.0 / math.log(2.0)


def forward_math(q, k, v, p, eps, scale):
    """-> (out (B, H, N, d), E / D (B, H, N, N), D (B, H, N), row max m (B, H, N) in natural units)."""
    N = q.shape[2]
    s = torch.matmul(q, k.transpose(-2, -1))
    s.mul_(scale)
    m = s.amax(dim=-1)
    s.sub_(m[..., None]).exp_()                                      # E, in place
    diag = s.diagonal(dim1=-2, dim2=-1)                              # (B, H, N) view of E_ii
    off = 1 - p[:, None, :]                                          # the diagonal's extra weight
    D = torch.matmul(s, p[:, None, :, None]).squeeze(-1) + diag * off + eps
    s.div_(D[..., None])                                             # E / D, in place (diag follows the view)
    out = torch.matmul(s, v * p[:, None, :, None]) + (diag * off)[..., None] * v
    if eps:
        out = out + (eps / N) * v.sum(dim=2, keepdim=True) / D[..., None]
    return out, s, D, m


def recompute_ed(q, k, m, D, scale):
    """E / D from q, k and the saved row max (natural units) and denominators: the (B, H, N, N) buffer again."""
    s = torch.matmul(q, k.transpose(-2, -1))
    s.mul_(scale)
    return s.sub_(m[..., None]).exp_().div_(D[..., None])


def backward_math(dout, q, k, v, p, out, Ed, D, eps, scale, needs=(True, True, True, True)):
    """-> (dq, dk, dv, dp) (None where `needs` says not needed). Ed is consumed (not modified)."""
    N = q.shape[2]
    need_q, need_k, need_v, need_p = needs
    pb = p[:, None, :]
    diag_Ed = Ed.diagonal(dim1=-2, dim2=-1)                          # (B, H, N): E_jj / D_j
    dq = dk = dv = dp = None
    if need_v:
        dv = pb[..., None] * torch.matmul(Ed.transpose(-2, -1), dout) + ((1 - pb) * diag_Ed)[..., None] * dout
        if eps:
            dv = dv + (eps / N) * (dout / D[..., None]).sum(dim=2, keepdim=True)
    if need_q or need_k or need_p:
        delta = (dout * out).sum(dim=-1, keepdim=True)               # (B, H, N, 1)
        G = torch.matmul(dout, v.transpose(-2, -1))                  # dA
        G.sub_(delta).mul_(Ed)                                       # G = (dA - delta) E / D
        G_diag = G.diagonal(dim1=-2, dim2=-1)
        if need_p:                                                   # column sums without the diagonal
            dp = (G.sum(dim=2) - G_diag).sum(dim=1)                  # (B, N)
        if need_q or need_k:
            keep_diag = G_diag.clone()
            G.mul_(pb[:, :, None, :])                                # * p_j off the diagonal ...
            G.diagonal(dim1=-2, dim2=-1).copy_(keep_diag)            # ... and p~_jj = 1 on it: ds
            if need_q:
                dq = torch.matmul(G, k).mul_(scale)
            if need_k:
                dk = torch.matmul(G.transpose(-2, -1), q).mul_(scale)
    return dq, dk, dv, dp


def _cdt(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def policy_attention_fwd_reference(q, k, v, policy, eps, softmax_scale):
    """The op's reference forward: q, k, v (B, N, H, d) -> (out (B, N, H, d) in q's dtype, row max (B, H, N) in
    log2 units, D (B, H, N)) -- the statistics as the Triton kernel saves them."""
    cdt = _cdt(q)
    qh, kh, vh = (t.to(cdt).transpose(1, 2) for t in (q, k, v))
    out, _, D, m = forward_math(qh, kh, vh, policy.to(cdt), eps, softmax_scale)
    return out.transpose(1, 2).contiguous().to(q.dtype), (m * _LOG2E).to(torch.float32), D.to(torch.float32)


def policy_attention_bwd_reference(dout, q, k, v, policy, out, row_max, denom, eps, softmax_scale):
    """The op's reference backward (recomputes E / D from the saved statistics) -> (dq, dk, dv) contiguous
    (B, N, H, d) in q's dtype and dpolicy (B, N) float32 (float64 for float64 inputs)."""
    cdt = _cdt(q)
    qh, kh, vh, oh, dh = (t.to(cdt).transpose(1, 2) for t in (q, k, v, out, dout))
    D = denom.to(cdt)
    Ed = recompute_ed(qh, kh, row_max.to(cdt) / _LOG2E, D, softmax_scale)
    dq, dk, dv, dp = backward_math(dh, qh, kh, vh, policy.to(cdt), oh, Ed, D, eps, softmax_scale)
    return (*(t.transpose(1, 2).contiguous().to(q.dtype) for t in (dq, dk, dv)), dp)


def policy_attention_eye(q, k, v, policy, eps=1e-6, softmax_scale=None):
    """The paper code's form, (B, H, N, d): the N x N eye matrix, the (B, 1, N, N) policy, plain autograd (the row
    max detached, as the other forms treat it). Slow and memory-hungry; for tests and the paper-form benchmark."""
    B, _, N, d = q.shape
    cdt = _cdt(q)
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    if policy is None:
        policy = q.new_ones(B, N, dtype=cdt)
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-2, -1)) * scale
    attn_policy = policy.to(cdt).reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=cdt, device=q.device).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    e = (s - s.amax(dim=-1, keepdim=True).detach()).exp() * attn_policy
    a = (e + eps / N) / (e.sum(dim=-1, keepdim=True) + eps)
    return torch.matmul(a, v.to(cdt)).to(q.dtype)
