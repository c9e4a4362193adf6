"""torch.ops.spvit.gelu_mlp: a transformer MLP fc2(gelu(fc1(h))) with GELU in the GEMM epilogues, fwd and bwd.

Three schemas (csrc/ops.cpp): `gelu_mlp_fwd` -> (out, u, g) and `gelu_mlp_bwd` -> (dh, dw1, db1, dw2, db2), each
with CPU / CUDA kernels (the shared check, then the default backend), a fake, and the forward's autograd formula
(`register_autograd`, calling the backward op); `gelu_mlp` is their composite front (CompositeImplicitAutograd),
so torch.compile graphs hold the two halves. Backends: "triton" (GPU, or CPU under TRITON_INTERPRET=1;
spvit_kernels/triton/gelu_mlp.py) and "reference" (PyTorch, any device, float64 allowed;
spvit_kernels/reference/gelu_mlp.py). One backend name serves both halves.
"""

import math

import torch

from .._triton_support import triton_device_types
from ..reference.gelu_mlp import gelu_mlp_bwd_reference, gelu_mlp_fwd_reference
from .._ext import _C  # noqa: F401  (loads the schemas)
from . import _library, _registry, _validate

FWD, BWD = "gelu_mlp", "gelu_mlp_backward"
_ANY_DEVICE = lambda: {"cpu", "cuda"}  # noqa: E731

_registry.register_backend(FWD, "reference", _ANY_DEVICE)(gelu_mlp_fwd_reference)
_registry.register_backend(BWD, "reference", _ANY_DEVICE)(gelu_mlp_bwd_reference)


_TRITON = "spvit_kernels.triton.gelu_mlp"
_registry.register_lazy(FWD, "triton", triton_device_types, _TRITON, "gelu_mlp_fwd_triton")
_registry.register_lazy(BWD, "triton", triton_device_types, _TRITON, "gelu_mlp_bwd_triton")


def _check_fwd(h, w1, b1, w2, b2, for_backward=True, *, allow_float64=False):
    _validate.gelu_mlp(h, w1, b1, w2, b2, allow_float64=allow_float64)
    if not isinstance(for_backward, bool):
        raise TypeError(f"for_backward must be a bool, got {type(for_backward).__name__}")
    return h.contiguous(), w1, b1, w2, b2, for_backward


def _check_bwd(dout, h, u, g, w1, b1, w2, b2, *, allow_float64=False):
    _validate.gelu_mlp_saved(dout, h, u, g, w1, b1, w2, b2, allow_float64=allow_float64)
    return dout.contiguous(), h.contiguous(), u.contiguous(), g.contiguous(), w1, b1, w2, b2


_library.register_backend_kernel("spvit::gelu_mlp_fwd", FWD, _check_fwd)
_library.register_backend_kernel("spvit::gelu_mlp_bwd", BWD, _check_bwd)


@torch.library.register_fake("spvit::gelu_mlp_fwd")
def _fwd_fake(h, w1, b1, w2, b2, for_backward=True):
    _check_fwd(h, w1, b1, w2, b2, for_backward, allow_float64=True)
    M = h.shape[0]
    u = h.new_empty((M, w1.shape[0]) if for_backward else (0,))
    return h.new_empty((M, w2.shape[0])), u, torch.empty_like(u)


def _bias_like(b, h):
    return torch.empty_like(b) if b is not None else h.new_empty((0,))


@torch.library.register_fake("spvit::gelu_mlp_bwd")
def _bwd_fake(dout, h, u, g, w1, b1, w2, b2):
    _check_bwd(dout, h, u, g, w1, b1, w2, b2, allow_float64=True)
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(w1), _bias_like(b1, h),
            torch.empty_like(w2), _bias_like(b2, h))


def _grads(ctx, dh, dw1, db1, dw2, db2, b1, b2):
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dw1 if need[1] else None, db1 if b1 is not None and need[2] else None,
            dw2 if need[3] else None, db2 if b2 is not None and need[4] else None)


def _setup_context(ctx, inputs, output):
    h, w1, b1, w2, b2 = inputs[:5]
    ctx.for_backward = inputs[5] if len(inputs) > 5 else True
    ctx.save_for_backward(h, output[1], output[2], w1, b1, w2, b2)


def _backward(ctx, dout, _du, _dg):
    if not ctx.for_backward:
        raise RuntimeError("gelu_mlp_fwd(..., for_backward=False) keeps nothing for backward; call it with "
                           "for_backward=True (the default) where a gradient is needed")
    h, u, g, w1, b1, w2, b2 = ctx.saved_tensors
    grads = torch.ops.spvit.gelu_mlp_bwd(dout, h, u, g, w1, b1, w2, b2)
    return _grads(ctx, *grads, b1, b2)


torch.library.register_autograd("spvit::gelu_mlp_fwd", _backward, setup_context=_setup_context)


@torch.library.impl("spvit::gelu_mlp", "CompositeImplicitAutograd")
def _composite(h, w1, b1, w2, b2):
    return torch.ops.spvit.gelu_mlp_fwd(h, w1, b1, w2, b2, _needs_grad(h, w1, b1, w2, b2))[0]


class _Eager(torch.autograd.Function):
    """The eager path with a named backend: the same forward / backward halves, called directly."""

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2, backend):
        out, u, g = _registry.resolve(FWD, backend, h.device).fn(h, w1, b1, w2, b2)
        ctx.save_for_backward(h, u, g, w1, b1, w2, b2)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, dout):
        h, u, g, w1, b1, w2, b2 = ctx.saved_tensors
        grads = _registry.resolve(BWD, ctx.backend, h.device).fn(dout.contiguous(), h, u, g, w1, b1, w2, b2)
        return (*_grads(ctx, *grads, b1, b2), None)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gelu_mlp(h, w1, b1, w2, b2, *, backend=None):
    """A transformer MLP, `fc2(gelu(fc1(h)))` with gelu the exact (erf) GELU of torch.nn.GELU(), with GELU in the
    GEMM epilogues: fc1's GEMM adds its bias and writes u and gelu(u) (no GELU pass), and backward the GEMM of
    fc2's input gradient multiplies by gelu'(u) (no GELU-backward pass). Differentiable in every input; where no
    gradient is needed (torch.no_grad, or no input requiring grad) fc1 writes gelu(u) only and nothing is kept.

    Args:
        h: (..., C) float32 / float16 / bfloat16 (float64 for backend="reference"); the product runs in h's dtype.
        w1: (F, C), b1: (F,) or None, w2: (C_out, F), b2: (C_out,) or None; any of those dtypes, rounded to h's
            dtype for the products (as autocast casts them), their gradients returned in their own dtypes.
        backend: None (fastest for the device), "triton", "reference".
    Returns:
        (..., C_out) in h's dtype.
    """
    lead = h.shape[:-1] if torch.is_tensor(h) else ()
    if torch.is_tensor(h) and h.dim() >= 1:
        h = h.reshape(math.prod(lead), h.shape[-1])  # the tokens as rows
    if torch.compiler.is_compiling():
        if backend is not None:
            raise ValueError(f"backend={backend!r}: under torch.compile call gelu_mlp with backend=None")
        return torch.ops.spvit.gelu_mlp(h, w1, b1, w2, b2).reshape(*lead, -1)
    h, w1, b1, w2, b2, _ = _check_fwd(h, w1, b1, w2, b2, allow_float64=backend == "reference")
    if not _needs_grad(h, w1, b1, w2, b2):  # e.g. the teacher's no_grad forward: u is not written, nothing kept
        return _registry.resolve(FWD, backend, h.device).fn(h, w1, b1, w2, b2, False)[0].reshape(*lead, -1)
    return _Eager.apply(h, w1, b1, w2, b2, backend).reshape(*lead, -1)
