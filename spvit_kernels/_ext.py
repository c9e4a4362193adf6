"""Loads the compiled extension `spvit_kernels._C` (op schemas + native kernels)."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from spvit_kernels import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "spvit_kernels._C is not built. Install the package with "
        "`pip install --no-build-isolation -e .` in an environment that has torch."
    ) from exc


def native(name):
    """The native kernel `name` (e.g. "prune_pack_cpu") if this build has it, else None."""
    return getattr(_C, name, None)


def build_info():
    """What the extension was compiled with: torch version, CUDA on/off, CUDA arch list, OpenMP."""
    return dict(_C.build_info())
