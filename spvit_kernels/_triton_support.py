"""Whether the Triton backend can run here, and on which device type."""

import functools
import os

import torch


def interpret_mode():
    """True under TRITON_INTERPRET=1: Triton programs run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_device_types():
    """Device types the Triton backend accepts in this process."""
    if not triton_importable():
        return set()
    if interpret_mode():
        return {"cpu"}
    return {"cuda"} if torch.cuda.is_available() else set()
