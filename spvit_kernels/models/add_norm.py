"""`x = x + drop_path(branch); h = norm(x)` of a pre-norm block, through the fused op where it serves the call.

On CUDA tensors with Triton, a plain LayerNorm (torch.nn.LayerNorm or a subclass, over the last dim) runs as
torch.ops.spvit.add_layer_norm: one pass instead of the add, the LayerNorm and (under autocast) the cast of its
float32 output to the GEMM's dtype; h then comes out in the autocast dtype, the values the next GEMM would have
read anyway. A timm DropPath on the branch (stochastic depth in training) goes into the same pass as a per-row
scale: its mask is drawn as timm draws it (same shape, dtype and random stream), so the values are timm's, and
neither the multiply nor its backward is a pass of its own. Everywhere else (CPU, other norms, float64) it is the
PyTorch calls, unchanged.
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


def drop_path_scale(drop_path, branch):
    """The per-row factors (branch.shape[:-1], float32) that timm's DropPath `drop_path` would multiply branch by,
    drawn as timm draws them (a (B, 1, ..., 1) Bernoulli mask in branch's dtype, divided by the keep probability
    when scale_by_keep); None when it does nothing (eval mode, rate 0) or is not a timm DropPath (`NotImplemented`:
    the caller applies the module itself)."""
    from timm.layers import DropPath

    if isinstance(drop_path, nn.Identity):
        return None
    if type(drop_path) is not DropPath:
        return NotImplemented
    if not drop_path.training or drop_path.drop_prob == 0.0:
        return None
    keep = 1.0 - drop_path.drop_prob
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
    if keep > 0.0 and drop_path.scale_by_keep:
        mask.div_(keep)
    return mask.float().reshape(mask.shape[:-1]).expand(branch.shape[:-1])


def add_norm(norm, x, branch, drop_path=None):
    """-> (x + drop_path(branch) (x itself when branch is None), norm of that). x (..., C); branch None or x's
    shape; drop_path None or a module applied to branch (nn.Identity, timm's DropPath, any other module)."""
    backend = fused_backend(norm, x)
    scale = None
    if branch is not None and drop_path is not None:
        # the op takes a timm DropPath as a per-row scale; anything else (and the PyTorch path) calls the module
        scale = drop_path_scale(drop_path, branch) if backend is not None else NotImplemented
        if scale is NotImplemented:
            branch, scale = drop_path(branch), None
    if backend is None:
        if branch is not None:
            x = x + branch
        return x, norm(x)
    from ..ops import add_layer_norm

    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if torch.compiler.is_compiling():
        backend = None  # the graph holds torch.ops.spvit.add_layer_norm, which picks its backend per device
    s, h = add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, out_dtype, scale, backend=backend)
    return (x if branch is None else s), h
