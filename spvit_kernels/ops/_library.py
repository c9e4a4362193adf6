"""Glue between the op schemas (declared in csrc/ops.cpp) and the Python backends.

`register_dispatch` installs, for the CPU and CUDA dispatch keys of `torch.ops.spvit.<op>`, a kernel that
runs the op's shared argument check (without any GPU synchronisation) and then the default backend for
the tensors' device. `call` is what the public Python functions use: eager calls go straight to the
chosen backend; under torch.compile they go through `torch.ops.spvit.<op>`, so the graph holds the op.
`schema_numbers` makes the Python functions take numbers the way `torch.ops.spvit.<op>` does (PyTorch's argument
parser turns a 0-dim tensor given for an int or float argument into its value before any kernel runs).
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


def register_backend_kernel(schema, op, check, tensor_arg=0):
    """Install for schema's CPU and CUDA keys: `check(*args)` (it raises on bad input and returns the backend's
    args), then the default backend of `op` for the device of args[tensor_arg]. For the two-halves training ops
    (forward / backward schemas whose checks never read tensor values)."""

    def kernel(*args):
        return _registry.resolve(op, None, args[tensor_arg].device).fn(*check(*args))

    kernel.__name__ = f"{op}_dispatch"
    torch.library.impl(schema, ["CPU", "CUDA"], kernel)


def _number_args(op):
    """{position: (name, "int" / "float")} of the int / float (optional or not) arguments of op's schema."""
    found = {}
    for i, a in enumerate(getattr(torch.ops.spvit, op).default._schema.arguments):
        t = a.type.getElementType() if a.type.kind() == "OptionalType" else a.type
        if t.kind() in ("IntType", "FloatType"):
            found[i] = (a.name, "int" if t.kind() == "IntType" else "float")
    return found


_NUMBER_ARGS = {}


def schema_numbers(op, args):
    """args with every 0-dim tensor given for an int / float schema argument replaced by its value, as the raw
    `torch.ops.spvit.<op>` entry point takes it: a float argument takes a real tensor, an int argument an integer
    one, neither one that requires grad. A bool stays a bool (the checks refuse it for a number: PyTorch's
    parser converts it to 0 / 1 before the raw entry point's kernel can see it)."""
    numbers = _NUMBER_ARGS.get(op)
    if numbers is None:
        numbers = _NUMBER_ARGS[op] = _number_args(op)
    if not any(i < len(args) and torch.is_tensor(args[i]) for i in numbers):
        return args
    out = list(args)
    for i, (name, kind) in numbers.items():
        v = out[i] if i < len(out) else None
        if not torch.is_tensor(v):
            continue
        wanted_int = kind == "int"
        ok_dtype = (not v.dtype.is_floating_point and not v.dtype.is_complex and v.dtype != torch.bool) \
            if wanted_int else (v.dtype != torch.bool and not v.dtype.is_complex)
        if v.dim() != 0 or v.requires_grad or not ok_dtype or v.device.type == "meta":
            raise TypeError(f"{name} must be {'an int' if wanted_int else 'a float'} (or a 0-dim "
                            f"{'integer' if wanted_int else 'real'} tensor without grad), got a tensor of shape "
                            f"{tuple(v.shape)}, dtype {str(v.dtype).replace('torch.', '')}"
                            + (", requires_grad" if v.requires_grad else ""))
        out[i] = int(v.item()) if wanted_int else float(v.item())
    return tuple(out)


def call(op, args, backend, check):
    """Run `op` on schema arguments `args` with the named (or default) backend."""
    if torch.compiler.is_compiling():  # the raw entry point takes numbers given as tensors itself
        if backend is not None:
            raise ValueError(f"backend={backend!r}: under torch.compile call {op} with backend=None")
        return getattr(torch.ops.spvit, op)(*args)
    args = schema_numbers(op, args)
    # meta tensors: shapes only, from the op's fake kernel (no backend can read meta data)
    if torch.is_tensor(args[0]) and args[0].device.type == "meta":
        return getattr(torch.ops.spvit, op)(*args)
    backend_args = check(*args, allow_sync=True, allow_float64=backend == "reference")
    return _registry.resolve(op, backend, args[0].device).fn(*backend_args)
