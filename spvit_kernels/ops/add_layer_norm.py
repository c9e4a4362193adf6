"""torch.ops.spvit.add_layer_norm: residual add + LayerNorm in one pass, forward and backward.

Three schemas (csrc/ops.cpp): `add_layer_norm_fwd` -> (s, y, mean, rstd) and `add_layer_norm_bwd` -> (dx, dbranch,
dweight, dbias), each with CPU / CUDA kernels (the shared check, then the default backend), a fake, and the
forward's autograd formula (`register_autograd`, calling the backward op); `add_layer_norm` is their composite
front (CompositeImplicitAutograd), so torch.compile graphs hold the two halves. Backends: "triton" (GPU, or CPU
under TRITON_INTERPRET=1; spvit_kernels/triton/add_layer_norm.py) and "reference" (PyTorch, any device, float64
allowed; spvit_kernels/reference/add_layer_norm.py). One backend name serves both halves.
"""

import torch

from .._triton_support import triton_device_types
from ..reference.add_layer_norm import add_layer_norm_bwd_reference, add_layer_norm_fwd_reference, compute_dtype
from .._ext import _C  # noqa: F401  (loads the schemas)
from . import _library, _registry, _validate

FWD, BWD = "add_layer_norm", "add_layer_norm_backward"
_ANY_DEVICE = lambda: {"cpu", "cuda"}  # noqa: E731

_registry.register_backend(FWD, "reference", _ANY_DEVICE)(add_layer_norm_fwd_reference)
_registry.register_backend(BWD, "reference", _ANY_DEVICE)(add_layer_norm_bwd_reference)


_TRITON = "spvit_kernels.triton.add_layer_norm"
_registry.register_lazy(FWD, "triton", triton_device_types, _TRITON, "add_layer_norm_fwd_triton")
_registry.register_lazy(BWD, "triton", triton_device_types, _TRITON, "add_layer_norm_bwd_triton")


def _contiguous(t):
    return t.contiguous() if t is not None else None


def _check_fwd(x, branch, weight, bias, eps, out_dtype, branch_scale=None, *, allow_float64=False):
    eps = _validate.add_layer_norm(x, branch, weight, bias, eps, out_dtype, branch_scale,
                                   allow_float64=allow_float64)
    return (x.contiguous(), _contiguous(branch), _contiguous(weight), _contiguous(bias), eps, out_dtype,
            _contiguous(branch_scale))


def _check_bwd(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype, branch_scale=None, *,
               allow_float64=False):
    _validate.add_layer_norm_saved(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype, branch_scale,
                                   allow_float64=allow_float64)
    return (_contiguous(dy), _contiguous(dsum), s.contiguous(), _contiguous(weight), _contiguous(bias),
            mean.contiguous(), rstd.contiguous(), x_dtype, branch_dtype, _contiguous(branch_scale))


_library.register_backend_kernel("spvit::add_layer_norm_fwd", FWD, _check_fwd)
# (the backward's first argument, dy, may be None: the device is s's)
_library.register_backend_kernel("spvit::add_layer_norm_bwd", BWD, _check_bwd, tensor_arg=2)


@torch.library.register_fake("spvit::add_layer_norm_fwd")
def _fwd_fake(x, branch, weight, bias, eps, out_dtype, branch_scale=None):
    _check_fwd(x, branch, weight, bias, eps, out_dtype, branch_scale, allow_float64=True)
    s_dtype = torch.promote_types(x.dtype, branch.dtype) if branch is not None else x.dtype
    s = x.new_empty(x.shape, dtype=s_dtype) if branch is not None else x.new_empty((0,))
    rows = x.numel() // x.shape[-1]
    stat = x.new_empty((rows,), dtype=compute_dtype(s.dtype))
    return s, x.new_empty(x.shape, dtype=out_dtype or s_dtype), stat, torch.empty_like(stat)


@torch.library.register_fake("spvit::add_layer_norm_bwd")
def _bwd_fake(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype, branch_scale=None):
    _check_bwd(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype, branch_scale, allow_float64=True)
    empty = s.new_empty((0,))
    return (s.new_empty(s.shape, dtype=x_dtype),
            s.new_empty(s.shape, dtype=branch_dtype) if branch_dtype is not None else empty,
            torch.empty_like(weight) if weight is not None else empty,
            torch.empty_like(bias) if bias is not None else empty)


def _saved(inputs, output):
    """(s, what backward needs to know) of a forward call: s is the output sum, or x itself without a branch."""
    x, branch = inputs[0], inputs[1]
    return (output[0] if branch is not None else x), x.dtype, (branch.dtype if branch is not None else None)


def _setup_context(ctx, inputs, output):
    _, _, weight, bias, _, _, branch_scale = inputs
    s, ctx.x_dtype, ctx.branch_dtype = _saved(inputs, output)
    ctx.save_for_backward(s, weight, bias, output[2], output[3], branch_scale)


def _grads(dx, dbranch, dw, db, ctx):
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dbranch if ctx.branch_dtype is not None and need[1] else None,
            dw if need[2] else None, db if need[3] else None)


def _backward(ctx, dsum, dy, _dmean, _drstd):
    s, weight, bias, mean, rstd, branch_scale = ctx.saved_tensors
    if ctx.branch_dtype is None:
        dsum = None  # s is x itself: no sum output, nothing reaches it
    dx, dbranch, dw, db = torch.ops.spvit.add_layer_norm_bwd(dy, dsum, s, weight, bias, mean, rstd, ctx.x_dtype,
                                                             ctx.branch_dtype, branch_scale)
    return (*_grads(dx, dbranch, dw, db, ctx), None, None, None)  # branch_scale: a constant (a random mask)


torch.library.register_autograd("spvit::add_layer_norm_fwd", _backward, setup_context=_setup_context)


@torch.library.impl("spvit::add_layer_norm", "CompositeImplicitAutograd")
def _composite(x, branch, weight, bias, eps=1e-5, out_dtype=None, branch_scale=None):
    s, y, _, _ = torch.ops.spvit.add_layer_norm_fwd(x, branch, weight, bias, eps, out_dtype, branch_scale)
    return s, y


class _Eager(torch.autograd.Function):
    """The eager path with a named backend: the same forward / backward halves, called directly."""

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, out_dtype, branch_scale, backend):
        fwd = _registry.resolve(FWD, backend, x.device).fn
        output = fwd(x, branch, weight, bias, eps, out_dtype, branch_scale)
        s, ctx.x_dtype, ctx.branch_dtype = _saved((x, branch), output)
        ctx.save_for_backward(s, weight, bias, output[2], output[3], branch_scale)
        ctx.backend = backend
        ctx.mark_non_differentiable(output[2], output[3])
        return output

    @staticmethod
    def backward(ctx, dsum, dy, _dmean, _drstd):
        s, weight, bias, mean, rstd, branch_scale = ctx.saved_tensors
        if ctx.branch_dtype is None:
            dsum = None
        bwd = _registry.resolve(BWD, ctx.backend, s.device).fn
        dx, dbranch, dw, db = bwd(_contiguous(dy), _contiguous(dsum), s, weight, bias, mean, rstd, ctx.x_dtype,
                                  ctx.branch_dtype, branch_scale)
        return (*_grads(dx, dbranch, dw, db, ctx), None, None, None, None)


def add_layer_norm(x, branch, weight, bias, eps=1e-5, out_dtype=None, branch_scale=None, *, backend=None):
    """Residual add + LayerNorm over the last dimension in one pass: s = x + branch, y = LayerNorm(s).

    The pre-norm block's `x = x + branch; h = norm(x)` (then, under autocast, h cast to the GEMM's dtype) with one
    read of x and branch and one write of s and y; differentiable in x, branch, weight and bias (the backward
    adds the gradient reaching s from the residual path to the LayerNorm's, and writes it in x's and branch's
    dtypes in one pass). Statistics in float32 (float64 for float64 inputs), the variance biased, as
    torch.nn.functional.layer_norm. With branch_scale, s = x + branch * branch_scale (one factor per row, the
    product rounded to branch's dtype): stochastic depth's `x + drop_path(branch)` in the same pass.

    Args:
        x: (..., C) float32 / float16 / bfloat16 (float64 for backend="reference"), 1 <= C <= 8192; the residual
            stream. Non-contiguous tensors are copied.
        branch: x's shape, any of those dtypes, or None (a plain LayerNorm of x; s is then not written).
        weight, bias: (C,) or None (no affine scale / shift).
        eps: >= 0, added to the variance.
        out_dtype: y's dtype; None = s's dtype (e.g. torch.bfloat16 under autocast: y feeds a bf16 GEMM).
        branch_scale: None, or x.shape[:-1], a float dtype (read as float32; with a branch): each row's factor,
            e.g. DropPath's per-image mask (0 or 1 / keep probability) expanded over the rows. No gradient.
        backend: None (fastest for the device), "triton", "reference".
    Returns:
        s: x + branch [* branch_scale] in their promoted dtype, x's shape; an empty (0,) tensor when branch is None.
        y: x's shape, out_dtype.
    """
    if torch.compiler.is_compiling():
        if backend is not None:
            raise ValueError(f"backend={backend!r}: under torch.compile call add_layer_norm with backend=None")
        return torch.ops.spvit.add_layer_norm(x, branch, weight, bias, eps, out_dtype, branch_scale)
    x, branch, weight, bias, eps, out_dtype, branch_scale = _library.schema_numbers(
        "add_layer_norm", (x, branch, weight, bias, eps, out_dtype, branch_scale))
    x, branch, weight, bias, eps, out_dtype, branch_scale = _check_fwd(
        x, branch, weight, bias, eps, out_dtype, branch_scale, allow_float64=backend == "reference")
    if branch_scale is not None:
        branch_scale = branch_scale.detach()
    s, y, _, _ = _Eager.apply(x, branch, weight, bias, eps, out_dtype, branch_scale, backend)
    return s, y
