"""The op layer common to every backend: registration, backend selection, argument errors."""

import pytest
import torch

import spvit_kernels  # noqa: F401
from spvit_kernels import ops
from spvit_kernels.ops import _registry

from .utils import make_cu_seqlens

OPS = ["token_scores", "prune_pack", "varlen_attention"]


@pytest.mark.parametrize("name", OPS)
def test_op_is_registered_with_fake(name):
    op = getattr(torch.ops.spvit, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    # The fake implementation lets FakeTensorMode / torch.compile trace the op.
    assert torch._library.simple_registry.singleton.find(op.name()).fake_impl.kernel is not None


@pytest.mark.parametrize("name", OPS)
def test_available_backends_always_has_reference(name):
    assert "reference" in ops.available_backends(name)


def test_available_backends_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        ops.available_backends("nope")


def test_unknown_backend_is_named():
    x = torch.randn(6, 8)
    cu = make_cu_seqlens([3, 3])
    s = torch.randn(6)
    with pytest.raises(ValueError, match="backend='nope'"):
        ops.prune_pack(x, cu, s, s.abs(), 0, "topk", num_keep=1, backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_backend_on_cpu_tensors_is_refused():
    x = torch.randn(6, 8)
    cu = make_cu_seqlens([3, 3])
    s = torch.randn(6)
    if "cuda" not in _registry._BACKENDS["prune_pack"]:
        pytest.skip("no CUDA backend compiled in")
    with pytest.raises(ValueError, match="backend='cuda'"):
        ops.prune_pack(x, cu, s, s.abs(), 0, "topk", num_keep=1, backend="cuda")
