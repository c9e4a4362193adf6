"""A timm block's MLP (fc1, GELU, fc2) with GELU in the GEMM epilogues where the fused op serves the call.

On CUDA tensors with Triton, a plain timm `Mlp` (nn.Linear fc1 and fc2, the exact nn.GELU, no norm, dropouts that
do nothing) runs as torch.ops.spvit.gelu_mlp: no GELU pass forward, no GELU-backward pass backward, and in a
no_grad forward (the teacher's) fc1 writes gelu(u) alone. Under autocast it runs in the autocast dtype (h cast to
it, as fc1 would cast it). Everywhere else it is `mlp(h)`.
"""

import torch
from torch import nn

from .._fusion import fused_gpu_tensor
from .._triton_support import triton_device_types


def _inactive(drop, training):
    return isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and (drop.p == 0 or not training))


def fused_backend(mlp, h):
    """The gelu_mlp backend serving `mlp` on h, or None for `mlp(h)` (tests may replace this)."""
    if not fused_gpu_tensor(h) or "cuda" not in triton_device_types():
        return None
    return "triton" if is_plain_gelu_mlp(mlp) else None


def is_plain_gelu_mlp(mlp):
    """fc1 -> exact GELU -> fc2 with nothing else that acts (timm Mlp as DeiT / ViT build it)."""
    parts = [getattr(mlp, n, None) for n in ("fc1", "act", "drop1", "norm", "fc2", "drop2")]
    if any(p is None for p in parts):
        return False
    fc1, act, drop1, norm, fc2, drop2 = parts
    return (type(fc1) is nn.Linear and type(fc2) is nn.Linear and type(act) is nn.GELU
            and act.approximate == "none" and isinstance(norm, nn.Identity)
            and _inactive(drop1, mlp.training) and _inactive(drop2, mlp.training))


def mlp_forward(mlp, h):
    """mlp(h), through torch.ops.spvit.gelu_mlp where `fused_backend` allows."""
    backend = fused_backend(mlp, h)
    if backend is None:
        return mlp(h)
    from ..ops import gelu_mlp

    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        h = h.to(torch.get_autocast_dtype(dev))
    if torch.compiler.is_compiling():
        backend = None  # the graph holds torch.ops.spvit.gelu_mlp, which picks its backend per device
    return gelu_mlp(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, backend=backend)
