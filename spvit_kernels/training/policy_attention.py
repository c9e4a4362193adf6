"""Attention with a keep policy, as SPViT trains (the paper code's `softmax_with_policy`), without N x N masks.

For scaled scores s (B, H, N, N), a policy p (B, N) (1 = the key is alive, with gradient) and eps >= 0:

    m_i   = max_j s_ij                                  (over all keys, alive or not)
    E_ij  = exp(s_ij - m_i)
    p~_ij = p_j + (1 - p_j) [i = j]                     (every row also sees itself)
    A_ij  = (E_ij p~_ij + eps / N) / (sum_j E_ij p~_ij + eps)
    out_i = sum_j A_ij v_j

computed in float32 (float64 for float64 inputs). The paper code materialises an N x N eye matrix, the (B, 1, N, N)
policy and several (B, H, N, N) intermediates that autograd keeps. Here p~ is never built: because p~ differs from
p only on the diagonal,

    sum_j E_ij p~_ij v_j = sum_j E_ij (p_j v_j) + E_ii (1 - p_i) v_i,

so the forward needs one (B, H, N, N) buffer (the scores, turned in place into E / D with D_i = sum_j E_ij p~_ij +
eps) and that buffer is all the backward keeps besides q, k, v, p, the output and D.

Backward (m_i treated as a constant: it only moves results through the eps terms, by O(eps)): with
W_ij = E_ij p~_ij, dA = dout v^T and delta_i = dout_i . out_i,

    G_ij  = (dA_ij - delta_i) E_ij / D_i
    ds_ij = G_ij p~_ij                 -> dq = scale ds k, dk = scale ds^T q
    dp_j  = sum_heads sum_{i != j} G_ij
    dv_j  = p_j sum_i (E_ij / D_i) dout_i + (1 - p_j) (E_jj / D_j) dout_j + (eps / N) sum_i dout_i / D_i

`policy_attention_reference` is the formula written out with the eye matrix, as the paper code writes it (float64
in the tests); the tests compare the two, forward and every gradient, and run gradcheck on the fused form.
"""

import torch


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _PolicyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, policy, eps, scale):
        # q, k, v (B, H, N, d) in the compute dtype; policy (B, N) in the compute dtype.
        N = q.shape[2]
        s = torch.matmul(q, k.transpose(-2, -1))
        s.mul_(scale)
        s.sub_(s.amax(dim=-1, keepdim=True)).exp_()                  # E, in place
        diag = s.diagonal(dim1=-2, dim2=-1)                          # (B, H, N) view of E_ii
        p = policy[:, None, :]                                       # (B, 1, N)
        off = 1 - p                                                  # the diagonal's extra weight
        D = torch.matmul(s, policy[:, None, :, None]).squeeze(-1) + diag * off + eps   # (B, H, N)
        s.div_(D[..., None])                                         # E / D, in place (diag follows the view)
        out = torch.matmul(s, v * p[..., None]) + (diag * off)[..., None] * v
        if eps:
            out = out + (eps / N) * v.sum(dim=2, keepdim=True) / D[..., None]
        ctx.save_for_backward(q, k, v, policy, s, D, out)
        ctx.eps, ctx.scale = eps, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, policy, Ed, D, out = ctx.saved_tensors
        eps, scale = ctx.eps, ctx.scale
        N = q.shape[2]
        need_q, need_k, need_v, need_p = ctx.needs_input_grad[:4]
        p = policy[:, None, :]
        diag_Ed = Ed.diagonal(dim1=-2, dim2=-1)                      # (B, H, N): E_jj / D_j
        dq = dk = dv = dp = None
        if need_v:
            dv = p[..., None] * torch.matmul(Ed.transpose(-2, -1), dout) + ((1 - p) * diag_Ed)[..., None] * dout
            if eps:
                dv = dv + (eps / N) * (dout / D[..., None]).sum(dim=2, keepdim=True)
        if need_q or need_k or need_p:
            delta = (dout * out).sum(dim=-1, keepdim=True)           # (B, H, N, 1)
            G = torch.matmul(dout, v.transpose(-2, -1))              # dA
            G.sub_(delta).mul_(Ed)                                   # G = (dA - delta) E / D
            G_diag = G.diagonal(dim1=-2, dim2=-1)
            if need_p:                                               # column sums without the diagonal
                dp = (G.sum(dim=2) - G_diag).sum(dim=1)              # (B, N)
            if need_q or need_k:
                keep_diag = G_diag.clone()
                G.mul_(p[:, :, None, :])                             # * p_j off the diagonal ...
                G.diagonal(dim1=-2, dim2=-1).copy_(keep_diag)        # ... and p~_jj = 1 on it: ds
                if need_q:
                    dq = torch.matmul(G, k).mul_(scale)
                if need_k:
                    dk = torch.matmul(G.transpose(-2, -1), q).mul_(scale)
        return dq, dk, dv, dp, None, None


def policy_attention(q, k, v, policy, eps=1e-6, softmax_scale=None):
    """SPViT's training attention with a keep policy (see the module docstring for the formula).

    Args:
        q, k, v: (B, H, N, d) (any strides; e.g. views of one qkv projection).
        policy: (B, N) float, 1 for keys every row may read, 0 for dropped keys, values in between allowed;
            None = all ones. It may require grad (the Gumbel straight-through keep mask does).
        eps: the paper code's smoothing constant (1e-6 in training; 0 gives the masked inference form).
        softmax_scale: None = d ** -0.5.
    Returns:
        (B, H, N, d) in q's dtype; computed in float32 (float64 for float64 q).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, N, d) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, _, N, d = q.shape
    cdt = _compute_dtype(q)
    if policy is None:
        policy = q.new_ones(B, N, dtype=cdt)
    elif policy.shape != (B, N):
        raise ValueError(f"policy must have shape (B, N) = {(B, N)}, got {tuple(policy.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = _PolicyAttention.apply(q.to(cdt), k.to(cdt), v.to(cdt), policy.to(cdt), float(eps), scale)
    return out.to(q.dtype)


def policy_attention_reference(q, k, v, policy, eps=1e-6, softmax_scale=None):
    """The same attention written as the paper code writes it: the eye matrix, the (B, 1, N, N) policy, plain
    autograd (the row max detached, as the fused form treats it). Slow and memory-hungry; for tests and the
    paper-form benchmark. Same arguments and result as `policy_attention`."""
    B, _, N, d = q.shape
    cdt = _compute_dtype(q)
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
