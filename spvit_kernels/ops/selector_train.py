"""torch.ops.spvit.selector_train: the SPViT selector's training form (`TokenSelector.train_scores`), forward and
backward.

Three schemas (csrc/ops.cpp), built like policy_attention: `selector_train_fwd` -> (score, prob, u_loc, glob, mean,
rstd) and `selector_train_bwd` -> (dS, dweights, the 14 weight gradients), each with CPU / CUDA kernels (the shared
check, then the default backend), a fake, and the forward's autograd formula (`register_autograd`, calling the
backward op); `selector_train` is their composite front (CompositeImplicitAutograd). Backends: "triton" (GPU, or CPU
under TRITON_INTERPRET=1; spvit_kernels/triton/selector_train.py) and "reference" (PyTorch, any device, float64
allowed; spvit_kernels/reference/selector_train.py). One backend name serves both halves.
"""

import torch

from .._triton_support import triton_device_types
from ..reference.selector_train import selector_train_bwd_reference, selector_train_fwd_reference
from .._ext import _C  # noqa: F401  (loads the schemas)
from . import _registry, _validate

FWD, BWD = "selector_train", "selector_train_backward"
_ANY_DEVICE = lambda: {"cpu", "cuda"}  # noqa: E731
_SAVED = ("score", "prob", "u_loc", "glob", "mean", "rstd")

_registry.register_backend(FWD, "reference", _ANY_DEVICE)(selector_train_fwd_reference)
_registry.register_backend(BWD, "reference", _ANY_DEVICE)(selector_train_bwd_reference)


_TRITON = "spvit_kernels.triton.selector_train"
_registry.register_lazy(FWD, "triton", triton_device_types, _TRITON, "selector_train_fwd_triton")
_registry.register_lazy(BWD, "triton", triton_device_types, _TRITON, "selector_train_bwd_triton")


def _check_fwd(S, weights, num_heads, *params, allow_float64=False):
    _validate.selector_train(S, weights, num_heads, params, allow_float64=allow_float64)
    return (S, weights.contiguous(), num_heads, *params)


def _check_bwd(dscore, dprob, S, weights, num_heads, *rest, allow_float64=False):
    if len(rest) != 14 + len(_SAVED):
        raise TypeError(f"selector_train_bwd takes 14 weights and {len(_SAVED)} saved tensors, got {len(rest)}")
    params, saved = rest[:14], rest[14:]
    _validate.selector_train(S, weights, num_heads, params, allow_float64=allow_float64)
    _validate.selector_train_saved(S, num_heads, dict(zip(("dscore", "dprob") + _SAVED, (dscore, dprob) + saved)))
    return (dscore.contiguous(), dprob.contiguous(), S, weights.contiguous(), num_heads, *params,
            *(t.contiguous() for t in saved))


def _kernel(op, check):
    def kernel(*args):
        S = args[0] if op == FWD else args[2]
        # float64 reaches only the reference backend, which the raw op's default picks on CPU; on CUDA the
        # default is Triton, whose check refuses it.
        return _registry.resolve(op, None, S.device).fn(*check(*args, allow_float64=S.device.type == "cpu"))

    return kernel


torch.library.impl("spvit::selector_train_fwd", ["CPU", "CUDA"], _kernel(FWD, _check_fwd))
torch.library.impl("spvit::selector_train_bwd", ["CPU", "CUDA"], _kernel(BWD, _check_bwd))


def _cdt(S):
    return torch.float64 if S.dtype == torch.float64 else torch.float32


@torch.library.register_fake("spvit::selector_train_fwd")
def _fwd_fake(S, weights, num_heads, *params):
    d = _validate.selector_train(S, weights, num_heads, params, allow_float64=True)
    B, M, _ = S.shape
    H, cdt = num_heads, _cdt(S)
    out = S.new_empty((B, M, 2), dtype=cdt)
    return (out, torch.empty_like(out), S.new_empty((B, M, H, d // 2), dtype=cdt),
            S.new_empty((B, H, d // 2), dtype=cdt), S.new_empty((B, M, H), dtype=cdt),
            S.new_empty((B, M, H), dtype=cdt))


@torch.library.register_fake("spvit::selector_train_bwd")
def _bwd_fake(dscore, dprob, S, weights, num_heads, *rest):
    _check_bwd(dscore, dprob, S, weights, num_heads, *rest, allow_float64=True)
    return (torch.empty_like(S), torch.empty_like(weights), *(torch.empty_like(p) for p in rest[:14]))


def _setup_context(ctx, inputs, output):
    S, weights, num_heads, *params = inputs
    ctx.save_for_backward(S, weights, *params, *output)
    ctx.num_heads = num_heads


def _zeros_if_none(g, like):
    # Only one of (score, prob) may be used: autograd then passes None for the other.
    return torch.zeros_like(like) if g is None else g


def _backward(ctx, dscore, dprob, *_dsaved):
    S, weights, *rest = ctx.saved_tensors
    params, saved = rest[:14], rest[14:]
    dscore, dprob = _zeros_if_none(dscore, saved[0]), _zeros_if_none(dprob, saved[1])
    grads = torch.ops.spvit.selector_train_bwd(dscore, dprob, S, weights, ctx.num_heads, *params, *saved)
    return grads[0], grads[1], None, *grads[2:]


torch.library.register_autograd("spvit::selector_train_fwd", _backward, setup_context=_setup_context)


@torch.library.impl("spvit::selector_train", "CompositeImplicitAutograd")
def _composite(S, weights, num_heads, *params):
    return tuple(torch.ops.spvit.selector_train_fwd(S, weights, num_heads, *params)[:2])


class _Eager(torch.autograd.Function):
    """The eager path with a named backend: the same forward / backward halves, called directly."""

    @staticmethod
    def forward(ctx, S, weights, num_heads, backend, *params):
        fwd = _registry.resolve(FWD, backend, S.device).fn
        out = fwd(S, weights, num_heads, *params)
        ctx.save_for_backward(S, weights, *params, *out)
        ctx.num_heads, ctx.backend = num_heads, backend
        ctx.mark_non_differentiable(*out[2:])
        return tuple(out)

    @staticmethod
    def backward(ctx, dscore, dprob, *_dsaved):
        S, weights, *rest = ctx.saved_tensors
        params, saved = rest[:14], rest[14:]
        dscore, dprob = _zeros_if_none(dscore, saved[0]), _zeros_if_none(dprob, saved[1])
        bwd = _registry.resolve(BWD, ctx.backend, S.device).fn
        grads = bwd(dscore.contiguous(), dprob.contiguous(), S, weights, ctx.num_heads, *params, *saved)
        return grads[0], grads[1], None, None, *grads[2:]


def selector_train(S, weights, num_heads, ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3, se_w1, se_b1,
                   se_w2, se_b2, *, backend=None):
    """The SPViT selector's training form, fused: `TokenSelector.train_scores(S, weights)` as one op with its own
    backward (differentiable in S, weights and all 14 selector weights).

    With d = C / num_heads, per image: u = GELU(proj_in(LayerNorm_d(S_h))) per row and head; the global half of u
    averaged over the rows with the weights (sum_i m_i u_i[d/2:] / max(sum_i m_i, tiny)); per-head logits of the
    score MLP on [u[:d/2], that mean]; SE head weights w = sigmoid(se2(GELU(se1(per-head channel means)))); score /
    prob = the w-weighted mean over the heads of log_softmax / softmax of the logits. Exact (erf) GELU.

    Args:
        S: (B, M, C) float32 / float16 / bfloat16 (float64 for backend="reference"): the rows of each image after
            its prefix rows. C / num_heads must be a multiple of 4 (the Triton backend takes head dims <= 128).
        weights: (B, M) float32 (float64 with float64 S): the previous keep mask m (may require grad).
        num_heads: H >= 2, dividing C.
        ln_weight, ln_bias: (d,) the per-head LayerNorm (eps 1e-5).
        w_in: (d, d), b_in: (d,) proj_in.
        w1: (d/2, d), b1: (d/2,); w2: (d/4, d/2), b2: (d/4,); w3: (2, d/4), b3: (2,) the score MLP.
        se_w1: (H//2, H), se_b1: (H//2,); se_w2: (H, H//2), se_b2: (H,) the SE branch.
            Every weight float32 or S's dtype, on S's device (`TokenSelector.op_weights()` gives them in order).
        backend: None (fastest for the device), "triton", "reference".
    Returns:
        (score, prob), each (B, M, 2) float32 (float64 for float64 S), index 0 = keep: the head-weighted
        log-softmax and softmax.
    """
    params = (ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3, se_w1, se_b1, se_w2, se_b2)
    if torch.compiler.is_compiling():
        if backend is not None:
            raise ValueError(f"backend={backend!r}: under torch.compile call selector_train with backend=None")
        return torch.ops.spvit.selector_train(S, weights, num_heads, *params)
    S, weights, num_heads, *params = _check_fwd(S, weights, num_heads, *params,
                                                allow_float64=backend == "reference")
    score, prob, *_ = _Eager.apply(S, weights, num_heads, backend, *params)
    return score, prob
