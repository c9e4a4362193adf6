"""torch.ops.spvit.varlen_attention: softmax attention inside each image of a ragged batch."""

import torch

from .. import reference
from . import _library, _registry, _validate

OP = "varlen_attention"
_ANY_DEVICE = lambda: {"cpu", "cuda"}  # noqa: E731

_registry.register_backend(OP, "reference", _ANY_DEVICE)(reference.varlen_attention_reference)


def _check(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None, *, allow_sync, allow_float64=False):
    _, max_seqlen, softmax_scale = _validate.varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, allow_sync=allow_sync, allow_float64=allow_float64)
    return (q, k, v, _validate.dense_seqlens(cu_seqlens), max_seqlen, softmax_scale)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None, *, backend=None):
    """Non-causal softmax attention of every image's tokens with the tokens of the same image.

    Args:
        q, k, v: (T, H, d) float32 / float16 / bfloat16, same shape; may be strided views (e.g. of a packed
            (T, 3, H, d) qkv tensor) as long as the last dimension is contiguous. d in {32, 64, 80, 96, 128}.
        cu_seqlens: (B+1,) int32 on q's device; image b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1.
        max_seqlen: the longest image (an upper bound is fine). Given, the op never synchronises with
            the GPU: GPU cu_seqlens are then not read back to be checked (the kernel clamps every image to
            [0, T], so bad values give wrong numbers, never an out-of-bounds access); None: it is read from
            cu_seqlens (one synchronisation on a GPU, which also checks them).
        softmax_scale: scale of q k^T before the softmax; default 1 / sqrt(d).
        backend: None (fastest for the device), "reference", "cpu", "triton".

    Returns:
        out: (T, H, d) contiguous, in q's dtype; out[i, h] = softmax(q[i, h] . K_h^T * scale) V_h over the
        rows of i's image, the softmax computed in float32.
    """
    return _library.call(OP, (q, k, v, cu_seqlens, max_seqlen, softmax_scale), backend, _check)


_library.register_dispatch(OP, _check)


@torch.library.register_fake("spvit::varlen_attention")
def _varlen_attention_fake(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None):
    # Also what a call with a tensor on `meta` reaches: the same checks (devices included) as the kernels.
    _check(q, k, v, cu_seqlens, max_seqlen, softmax_scale, allow_sync=False)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
