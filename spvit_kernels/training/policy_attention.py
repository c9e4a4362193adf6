"""Attention with a keep policy, as SPViT trains (the paper code's `softmax_with_policy`), without N x N masks.

    policy_attention(q, k, v, policy, eps=1e-6, softmax_scale=None)   q, k, v (B, H, N, d): the training forward's
                                                                      attention, differentiable in every input

For scaled scores s, a policy p (B, N) (1 = the key is alive; it carries gradient) and eps >= 0:
A_ij = (e^(s_ij - m_i) p~_ij + eps/N) / (sum_j e^(s_ij - m_i) p~_ij + eps), p~_ij = p_j + (1 - p_j)[i = j],
m_i the row max over every key, computed in float32 (float64 for float64 inputs); see
spvit_kernels/reference/policy_attention.py for the formulas of the forward and of the backward (the row max
treated as a constant, which moves results only through the eps terms, by O(eps)).

On CUDA tensors with Triton, the computation runs in `torch.ops.spvit.policy_attention` (FlashAttention-style
Triton kernels, forward and backward, O(N) memory per row: spvit_kernels/ops/policy_attention.py). Elsewhere it is
one autograd function in PyTorch that builds neither the N x N eye matrix nor the (B, 1, N, N) policy: its forward
allocates one (B, H, N, N) buffer, which is also all its backward keeps besides q, k, v, p, D and the output (the
paper form keeps several). `policy_attention_reference` is the paper code's form (eye matrix, plain autograd).
"""

import torch

from .._fusion import fused_gpu_tensor
from ..reference.policy_attention import backward_math, forward_math
from ..reference.policy_attention import policy_attention_eye as policy_attention_reference

__all__ = ["policy_attention", "policy_attention_reference"]


class _PolicyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, policy, eps, scale):
        out, Ed, D, _ = forward_math(q, k, v, policy, eps, scale)
        ctx.save_for_backward(q, k, v, policy, Ed, D, out)
        ctx.eps, ctx.scale = eps, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, policy, Ed, D, out = ctx.saved_tensors
        grads = backward_math(dout, q, k, v, policy, out, Ed, D, ctx.eps, ctx.scale, ctx.needs_input_grad[:4])
        return (*grads, None, None)


def _use_op(q):
    """Whether the fused op serves this call: CUDA tensors, Triton present, a head dim its kernels take."""
    if not fused_gpu_tensor(q):
        return False
    from ..ops import available_backends
    from ..ops._validate import POLICY_HEAD_DIMS

    return q.shape[-1] in POLICY_HEAD_DIMS and "triton" in available_backends("policy_attention")


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
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if policy is None:
        policy = q.new_ones(B, N, dtype=cdt)
    elif policy.shape != (B, N):
        raise ValueError(f"policy must have shape (B, N) = {(B, N)}, got {tuple(policy.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    if _use_op(q):
        from ..ops import policy_attention as op

        out = op(*(t.transpose(1, 2) for t in (q, k, v)), policy.float(), float(eps), scale)
        return out.transpose(1, 2)
    out = _PolicyAttention.apply(q.to(cdt), k.to(cdt), v.to(cdt), policy.to(cdt), float(eps), scale)
    return out.to(q.dtype)
