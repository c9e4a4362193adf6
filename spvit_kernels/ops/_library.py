"""Glue between the op schemas (declared in csrc/ops.cpp) and the Python backends.

`register_dispatch` installs, for the CPU and CUDA dispatch keys of `torch.ops.spvit.<op>`, a kernel that
runs the op's shared argument check (without any GPU synchronisation) and then the default backend for
the tensors' device. `call` is what the public Python functions use: eager calls go straight to the
chosen backend; under torch.compile they go through `torch.ops.spvit.<op>`, so the graph holds the op.
"""

import torch

from . import _registry
from .._ext import _C  # noqa: F401  (loads the schemas)


def register_dispatch(op, check):
    """`check(*args, allow_sync=False)` validates the op's schema arguments and returns the backend's args."""

    def kernel(*args):
        backend_args = check(*args, allow_sync=False)
        return _registry.resolve(op, None, args[0].device).fn(*backend_args)

    kernel.__name__ = f"{op}_dispatch"
    torch.library.impl(f"spvit::{op}", ["CPU", "CUDA"], kernel)


def call(op, args, backend, check):
    """Run `op` on schema arguments `args` with the named (or default) backend."""
    if torch.compiler.is_compiling():
        if backend is not None:
            raise ValueError(f"backend={backend!r}: under torch.compile call {op} with backend=None")
        return getattr(torch.ops.spvit, op)(*args)
    # meta tensors: shapes only, from the op's fake kernel (no backend can read meta data)
    if torch.is_tensor(args[0]) and args[0].device.type == "meta":
        return getattr(torch.ops.spvit, op)(*args)
    backend_args = check(*args, allow_sync=True, allow_float64=backend == "reference")
    return _registry.resolve(op, backend, args[0].device).fn(*backend_args)
