"""Backends of each op: which implementations exist, which are usable here, which one is the default.

Every op has a `"reference"` backend (pure PyTorch, any device). The fast ones register themselves
with `register_backend`; `DEFAULT_ORDER` says which one `backend=None` picks for a device type.
"""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

# backend=None on a device type picks the first usable backend of this list.
DEFAULT_ORDER = {
    "token_scores": {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")},
    "prune_pack": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "varlen_attention": {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")},
    # One backend name serves both halves of policy_attention (forward and backward must match).
    "policy_attention": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "policy_attention_backward": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    # selector_train likewise: one backend name for its forward and backward halves.
    "selector_train": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "selector_train_backward": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    # add_layer_norm likewise (its backward reads the forward's statistics).
    "add_layer_norm": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "add_layer_norm_backward": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "gelu_mlp": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "gelu_mlp_backward": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
}


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    # Device types ("cpu", "cuda") the backend accepts in this process; evaluated lazily because
    # e.g. the Triton backend's answer depends on TRITON_INTERPRET and on a visible GPU.
    device_types: Callable[[], set]


_BACKENDS: dict = {name: {} for name in DEFAULT_ORDER}


def register_backend(op, name, device_types):
    """Decorator: register `fn` as backend `name` of `op`, usable on `device_types()`."""

    def wrap(fn):
        _BACKENDS[op][name] = Backend(name, fn, device_types)
        return fn

    return wrap


def register_lazy(op, name, device_types, module, function):
    """Register backend `name` of `op` as `module.function` (e.g. "spvit_kernels.triton.gelu_mlp"), imported at
    its first call, so that importing the ops never imports Triton."""

    def call(*args):
        return getattr(importlib.import_module(module), function)(*args)

    call.__name__ = function
    register_backend(op, name, device_types)(call)


def _usable_device_types():
    types = {"cpu"}
    if torch.cuda.is_available():
        types.add("cuda")
    return types


def available_backends(op):
    """Names of the backends of `op` that can run in this process (on some device present here)."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_BACKENDS)}")
    here = _usable_device_types()
    return [name for name, b in _BACKENDS[op].items() if b.device_types() & here]


def resolve(op, backend, device):
    """The Backend that runs `op` on tensors of `device` (backend=None: the default for the device)."""
    table = _BACKENDS[op]
    dev = torch.device(device).type
    if backend is None:
        for name in DEFAULT_ORDER[op].get(dev, ("reference",)):
            b = table.get(name)
            if b is not None and dev in b.device_types():
                return b
        return table["reference"]
    if backend not in table:
        raise ValueError(f"backend={backend!r} is not a backend of {op}; expected one of {sorted(table)}")
    b = table[backend]
    if dev not in b.device_types():
        usable = sorted(b.device_types()) or ["none in this process"]
        raise ValueError(
            f"backend={backend!r} of {op} cannot run on {dev} tensors here (it accepts: {', '.join(usable)})")
    return b
