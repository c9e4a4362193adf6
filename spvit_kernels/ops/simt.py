"""The SIMT execution layer that runs the CUDA C++ kernels (csrc/cuda/*.cu) on CPU tensors.

The `cuda_simt` backends execute the same device code nvcc compiles, each CUDA thread a CPU fiber (see
csrc/simt/simt.h). They exist so that tests run the CUDA C++ kernels on machines without a GPU; they are
slow and never picked by backend=None.

Between two barriers the threads of a block run one after another, in an order set by the schedule seed:
seed % 4 == 0 in order, 1 reversed, 2 one warp (drawn from the seed) ahead, 3 a random permutation drawn
from the seed. A kernel with a missing barrier gives a different result under some schedule. The seed is
process-wide: `simt_schedule(seed)` sets it for a `with` block; the environment variable SPVIT_SIMT_SEED
sets the initial one (default 0).
"""

import contextlib
import os

from .._ext import native

SCHEDULES = {0: "in order", 1: "reversed", 2: "one warp ahead", 3: "random"}

_set_schedule = native("simt_set_schedule")
_get_schedule = native("simt_schedule")


def _check_seed(seed, name):
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{name} must be an int >= 0, got {seed!r}")
    return seed


@contextlib.contextmanager
def simt_schedule(seed):
    """Run the SIMT launches inside the `with` block under schedule `seed` (int >= 0; see the module doc)."""
    _check_seed(seed, "seed")
    old = _get_schedule()
    _set_schedule(seed)
    try:
        yield
    finally:
        _set_schedule(old)


def current_schedule():
    """The schedule seed of the following SIMT launches."""
    return _get_schedule()


if _set_schedule is not None and os.environ.get("SPVIT_SIMT_SEED"):
    try:
        _env_seed = int(os.environ["SPVIT_SIMT_SEED"])
    except ValueError:
        raise ValueError(f"SPVIT_SIMT_SEED must be an int >= 0, got {os.environ['SPVIT_SIMT_SEED']!r}") from None
    _set_schedule(_check_seed(_env_seed, "SPVIT_SIMT_SEED"))
