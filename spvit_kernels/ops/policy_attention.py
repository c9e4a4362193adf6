"""torch.ops.spvit.policy_attention: SPViT's training attention with a keep policy, forward and backward.

Three schemas (csrc/ops.cpp): `policy_attention_fwd` -> (out, row_max, denom) and `policy_attention_bwd` ->
(dq, dk, dv, dpolicy), each with CPU / CUDA kernels (the shared check, then the default backend), a fake, and the
forward's autograd formula (`register_autograd`, calling the backward op); `policy_attention` is their composite
front (CompositeImplicitAutograd), so torch.compile graphs hold the two halves. Backends: "triton" (GPU, or CPU
under TRITON_INTERPRET=1; spvit_kernels/triton/policy_attention.py) and "reference" (PyTorch, any device,
float64 allowed; spvit_kernels/reference/policy_attention.py). One backend name serves both halves.
"""

import torch

from .._triton_support import triton_device_types
from ..reference.policy_attention import policy_attention_bwd_reference, policy_attention_fwd_reference
from .._ext import _C  # noqa: F401  (loads the schemas)
from . import _library, _registry, _validate

FWD, BWD = "policy_attention", "policy_attention_backward"
_ANY_DEVICE = lambda: {"cpu", "cuda"}  # noqa: E731

_registry.register_backend(FWD, "reference", _ANY_DEVICE)(policy_attention_fwd_reference)
_registry.register_backend(BWD, "reference", _ANY_DEVICE)(policy_attention_bwd_reference)


@_registry.register_backend(FWD, "triton", triton_device_types)
def _fwd_triton(q, k, v, policy, eps, softmax_scale):
    from ..triton.policy_attention import policy_attention_fwd_triton  # lazy: Triton only when used

    return policy_attention_fwd_triton(q, k, v, policy.contiguous(), eps, softmax_scale)


@_registry.register_backend(BWD, "triton", triton_device_types)
def _bwd_triton(dout, q, k, v, policy, out, row_max, denom, eps, softmax_scale):
    from ..triton.policy_attention import policy_attention_bwd_triton

    return policy_attention_bwd_triton(dout, q, k, v, policy.contiguous(), out, row_max, denom, eps, softmax_scale)


def _check_fwd(q, k, v, policy, eps, softmax_scale, *, allow_float64=False):
    eps, scale = _validate.policy_attention(q, k, v, policy, eps, softmax_scale, allow_float64=allow_float64)
    return q, k, v, policy, eps, scale


def _check_bwd(dout, q, k, v, policy, out, row_max, denom, eps, softmax_scale, *, allow_float64=False):
    eps, scale = _validate.policy_attention(q, k, v, policy, eps, softmax_scale, allow_float64=allow_float64)
    B, N, H, d = q.shape
    for name, t, shape in (("dout", dout, (B, N, H, d)), ("out", out, (B, N, H, d)), ("row_max", row_max, (B, H, N)),
                           ("denom", denom, (B, H, N))):
        _validate.check_tensor(t, name, device=q.device)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return dout.contiguous(), q, k, v, policy, out, row_max.contiguous(), denom.contiguous(), eps, scale


_library.register_backend_kernel("spvit::policy_attention_fwd", FWD, _check_fwd)
_library.register_backend_kernel("spvit::policy_attention_bwd", BWD, _check_bwd)


@torch.library.register_fake("spvit::policy_attention_fwd")
def _fwd_fake(q, k, v, policy, eps, softmax_scale):
    _check_fwd(q, k, v, policy, eps, softmax_scale)
    B, N, H, _ = q.shape
    stat = q.new_empty((B, H, N), dtype=torch.float32)
    return q.new_empty(q.shape), stat, torch.empty_like(stat)


@torch.library.register_fake("spvit::policy_attention_bwd")
def _bwd_fake(dout, q, k, v, policy, out, row_max, denom, eps, softmax_scale):
    _check_bwd(dout, q, k, v, policy, out, row_max, denom, eps, softmax_scale)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), policy.new_empty(policy.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, policy, eps, scale = inputs
    out, row_max, denom = output
    ctx.save_for_backward(q, k, v, policy, out, row_max, denom)
    ctx.eps, ctx.scale = eps, scale


def _backward(ctx, dout, _drow_max, _ddenom):
    q, k, v, policy, out, row_max, denom = ctx.saved_tensors
    dq, dk, dv, dp = torch.ops.spvit.policy_attention_bwd(dout, q, k, v, policy, out, row_max, denom, ctx.eps,
                                                          ctx.scale)
    return dq, dk, dv, dp.to(policy.dtype), None, None


torch.library.register_autograd("spvit::policy_attention_fwd", _backward, setup_context=_setup_context)


@torch.library.impl("spvit::policy_attention", "CompositeImplicitAutograd")
def _composite(q, k, v, policy, eps=1e-6, softmax_scale=None):
    scale = _validate.policy_attention(q, k, v, policy, eps, softmax_scale)[1]
    return torch.ops.spvit.policy_attention_fwd(q, k, v, policy, eps, scale)[0]


class _Eager(torch.autograd.Function):
    """The eager path with a named backend: the same forward / backward halves, called directly."""

    @staticmethod
    def forward(ctx, q, k, v, policy, eps, scale, backend):
        fwd = _registry.resolve(FWD, backend, q.device).fn
        out, row_max, denom = fwd(q, k, v, policy, eps, scale)
        ctx.save_for_backward(q, k, v, policy, out, row_max, denom)
        ctx.eps, ctx.scale, ctx.backend = eps, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, policy, out, row_max, denom = ctx.saved_tensors
        bwd = _registry.resolve(BWD, ctx.backend, q.device).fn
        dq, dk, dv, dp = bwd(dout.contiguous(), q, k, v, policy, out, row_max, denom, ctx.eps, ctx.scale)
        return dq, dk, dv, dp.to(policy.dtype), None, None, None


def policy_attention(q, k, v, policy, eps=1e-6, softmax_scale=None, *, backend=None):
    """SPViT's training attention: softmax attention whose keys are weighted by a keep policy.

    With s_ij = softmax_scale q_i . k_j, m_i = max_j s_ij (over every key), p~_ij = p_j + (1 - p_j)[i = j]:
        out_i = sum_j (e^(s_ij - m_i) p~_ij + eps / N) v_j / (sum_j e^(s_ij - m_i) p~_ij + eps)
    per image and head, softmax statistics in float32; differentiable in q, k, v and policy (the row max is
    treated as a constant in the gradient, which moves it by O(eps)).

    Args:
        q, k, v: (B, N, H, d) float32 / float16 / bfloat16 (float64 for backend="reference"), same shape, last
            dim contiguous; may be strided views of one packed (B, N, 3, H, d) qkv. 16 <= d <= 128.
        policy: (B, N) float32 (float64 with float64 q): 1 = every row may read the key, 0 = dropped (the
            row of a dropped token still reads itself), values in between allowed.
        eps: >= 0, the paper code's smoothing (1e-6 in training; 0 = masked softmax).
        softmax_scale: default 1 / sqrt(d).
        backend: None (fastest for the device), "triton", "reference".
    Returns:
        out: (B, N, H, d) contiguous, q's dtype.
    """
    if torch.compiler.is_compiling():
        if backend is not None:
            raise ValueError(f"backend={backend!r}: under torch.compile call policy_attention with backend=None")
        return torch.ops.spvit.policy_attention(q, k, v, policy, eps, softmax_scale)
    q, k, v, policy, eps, softmax_scale = _library.schema_numbers("policy_attention",
                                                                  (q, k, v, policy, eps, softmax_scale))
    _, _, _, _, eps, scale = _check_fwd(q, k, v, policy, eps, softmax_scale, allow_float64=backend == "reference")
    return _Eager.apply(q, k, v, policy, eps, scale, backend)
