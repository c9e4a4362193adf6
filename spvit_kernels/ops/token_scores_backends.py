"""Fast backends of token_scores: "triton" (GPU, or CPU under TRITON_INTERPRET=1) and "cpu" (C++).

Both receive the tuple of `token_scores._check`: (x, cu_seqlens, num_packages, num_heads, ln_weight, ln_bias,
w_in, b_in, w1, b1, w2, b2, w3, b3, se_w1, se_b1, se_w2, se_b2, num_prefix), already validated: x (T, C) with contiguous
rows (any row stride), cu_seqlens (B+1,) int32 on x's device, weights float32 or x's dtype. Both return
(keep_score, keep_prob), float32 of shape (T,); prefix and package rows get +inf / 1.

"triton": spvit_kernels/triton/token_scores.py (two launches, no host synchronisation).
"cpu": csrc/cpu/token_scores_cpu.cpp (at::parallel_for, float32 accumulation), registered only when the
compiled extension has it.
"""

from .._ext import native
from .._triton_support import triton_device_types
from ._registry import register_backend

OP = "token_scores"


@register_backend(OP, "triton", triton_device_types)
def token_scores_triton(*args):
    """Fused Triton selector; see spvit_kernels/triton/token_scores.py."""
    from ..triton.token_scores import token_scores_triton as fwd  # lazy: Triton only when used

    return fwd(*args)


_cpu_kernel = native("token_scores_cpu")

if _cpu_kernel is not None:

    @register_backend(OP, "cpu", lambda: {"cpu"})
    def token_scores_cpu(*args):
        """Fused C++ selector on CPU tensors; see csrc/cpu/token_scores_cpu.cpp."""
        return _cpu_kernel(*args)
