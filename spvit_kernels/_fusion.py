"""One switch for the training forward's fused GPU kernels (policy_attention, selector_train, add_layer_norm,
gelu_mlp): on by default; `fused_kernels(False)` runs the library's PyTorch forms instead, e.g. to compare them
on one GPU. A module global, not thread-local, so torch.compile guards on it."""

import contextlib

import torch

_ENABLED = True


def fused_kernels_enabled():
    return _ENABLED


def fused_gpu_tensor(t):
    """Whether a fused training kernel may serve tensor t at all: switched on, a CUDA tensor, not float64 (each
    caller then checks that its backend is present and takes t's shapes)."""
    return _ENABLED and t.is_cuda and t.dtype != torch.float64


@contextlib.contextmanager
def fused_kernels(enabled=True):
    """Within the block, the training forward uses its fused GPU kernels (enabled=True, the default outside any
    block) or the PyTorch forms of the same computations (enabled=False). Restores the previous state on exit."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous
