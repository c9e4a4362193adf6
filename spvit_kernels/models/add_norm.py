"""`x = x + branch; h = norm(x)` of a pre-norm block, through the fused op where it serves the call.

On CUDA tensors with Triton, a plain LayerNorm (torch.nn.LayerNorm or a subclass, over the last dim) runs as
torch.ops.spvit.add_layer_norm: one pass instead of the add, the LayerNorm and (under autocast) the cast of its
float32 output to the GEMM's dtype; h then comes out in the autocast dtype, the values the next GEMM would have
read anyway. Everywhere else (CPU, other norms, float64) it is the two PyTorch calls, unchanged.
"""

import torch
from torch import nn

from .._fusion import fused_gpu_tensor
from .._triton_support import triton_device_types


def fused_backend(norm, x):
    """The add_layer_norm backend serving `norm` on x, or None for the PyTorch calls (tests may replace this)."""
    if not fused_gpu_tensor(x) or "cuda" not in triton_device_types():
        return None
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (x.shape[-1],):
        return None
    from ..ops._validate import ADD_LAYER_NORM_MAX_CHANNELS

    return "triton" if x.shape[-1] <= ADD_LAYER_NORM_MAX_CHANNELS else None


def add_norm(norm, x, branch):
    """-> (x + branch (x itself when branch is None), norm(x + branch)). x (..., C); branch None or x's shape."""
    backend = fused_backend(norm, x)
    if backend is None:
        if branch is not None:
            x = x + branch
        return x, norm(x)
    from ..ops import add_layer_norm

    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if torch.compiler.is_compiling():
        backend = None  # the graph holds torch.ops.spvit.add_layer_norm, which picks its backend per device
    s, h = add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, out_dtype, backend=backend)
    return (x if branch is None else s), h
