"""torch.ops.spvit.token_scores: per-head token scoring of the SPViT selector (design section 2)."""

import torch

from .. import reference
from . import _library, _registry, _validate

OP = "token_scores"
_ANY_DEVICE = lambda: {"cpu", "cuda"}  # noqa: E731

_registry.register_backend(OP, "reference", _ANY_DEVICE)(reference.token_scores_reference)


def _check(x, cu_seqlens, num_packages, num_heads, *weights_and_prefix, allow_sync, allow_float64=False):
    # The schema's arguments: the 14 weights, then num_prefix (absent when a caller leaves its default).
    weights = weights_and_prefix[:14]
    num_prefix = weights_and_prefix[14] if len(weights_and_prefix) > 14 else 1
    _validate.token_scores(x, cu_seqlens, num_packages, num_heads,
                           dict(zip(_validate.TOKEN_SCORES_WEIGHTS, weights)), num_prefix,
                           allow_sync=allow_sync, allow_float64=allow_float64)
    return (x, _validate.dense_seqlens(cu_seqlens), num_packages, num_heads, *weights, num_prefix)


def token_scores(x, cu_seqlens, num_packages, num_heads, ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2,
                 w3, b3, se_w1, se_b1, se_w2, se_b2, *, num_prefix=1, backend=None):
    """Score every spatial token of a ragged batch with the SPViT selector (per-head MLP + SE weights).

    Image b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1 of x, laid out as
    [num_prefix prefix rows, spatial tokens, num_packages package tokens]. Each image's rows other than
    the prefix rows form S (M x C), over which the per-head global mean is taken; only spatial rows get
    a real score.

    Args:
        x: (T, C) tokens, float32 / float16 / bfloat16, rows contiguous.
        cu_seqlens: (B+1,) int32 on x's device, cu_seqlens[0] = 0, cu_seqlens[B] = T.
        num_packages: package rows at the end of every image (>= 0).
        num_heads: H; C must be divisible by H and d = C / H by 4.
        ln_weight, ln_bias: (d,) per-head LayerNorm affine (shared by all heads, eps 1e-5).
        w_in, b_in: (d, d), (d,) input projection.
        w1, b1: (d/2, d), (d/2,); w2, b2: (d/4, d/2), (d/4,); w3, b3: (2, d/4), (2,) score MLP.
        se_w1, se_b1: (H//2, H), (H//2,); se_w2, se_b2: (H, H//2), (H,) SE head weights.
        All weights float32 or x's dtype, on x's device, in nn.Linear's (out, in) layout.
        num_prefix: rows at the start of every image that are never scored (class token, distillation
            token, register tokens; 0 for a model without class token). Default 1 (the cls row).
            Every image needs at least num_prefix + num_packages rows.
        backend: None (fastest for the device), "reference", "cpu", "triton".

    Returns:
        (keep_score, keep_prob): float32 tensors of shape (T,). keep_score = score[keep] - score[drop]
        of the head-weighted log-softmax, keep_prob the head-weighted softmax probability of keep.
        Prefix and package rows get keep_score = +inf, keep_prob = 1.
    """
    args = (x, cu_seqlens, num_packages, num_heads, ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3,
            se_w1, se_b1, se_w2, se_b2, num_prefix)
    return _library.call(OP, args, backend, _check)


_library.register_dispatch(OP, _check)


@torch.library.register_fake("spvit::token_scores")
def _token_scores_fake(x, cu_seqlens, num_packages, num_heads, *weights_and_prefix):
    # Also what a call with a tensor on `meta` reaches: the same checks (devices included) as the kernels.
    _check(x, cu_seqlens, num_packages, num_heads, *weights_and_prefix, allow_sync=False)
    T = x.shape[0]
    return x.new_empty((T,), dtype=torch.float32), x.new_empty((T,), dtype=torch.float32)
