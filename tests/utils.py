"""Helpers shared by the op tests: ragged batches, poisoned outputs, tolerances per dtype."""

import os

import pytest
import torch

from spvit_kernels._triton_support import triton_device_types

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# A GPU test runs a backend on CUDA; an interpreter test runs the Triton backend on CPU.
HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
requires_gpu = pytest.mark.gpu
requires_triton_interpret = pytest.mark.skipif(
    "cpu" not in triton_device_types(), reason="needs Triton with TRITON_INTERPRET=1 (set by conftest without a GPU)")


def make_cu_seqlens(lengths, device="cpu"):
    """cu_seqlens (int32, B+1) for images of the given lengths."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(torch.int32).to(device)


def poison_like(t):
    """A tensor of t's shape and dtype full of values no correct kernel writes (NaN / -77 for ints)."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -77)


def random_lengths(batch, low, high, generator=None):
    return torch.randint(low, high + 1, (batch,), generator=generator).tolist()


def non_contiguous(t):
    """The values of `t` as a non-contiguous view: every other element along the last dimension of a wider
    buffer (whose other elements are poison), so a kernel that ignores strides reads wrong values."""
    buf = poison_like(torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device))
    view = buf[..., ::2]
    view.copy_(t)
    assert t.numel() <= 1 or not view.is_contiguous()
    return view
