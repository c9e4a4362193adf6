"""Fast backends of varlen_attention: "triton" (GPU, or CPU under TRITON_INTERPRET=1) and "cpu".

Both receive the tuple of `varlen_attention._check`: (q, k, v, cu_seqlens, max_seqlen: int | None,
softmax_scale: float), with q, k, v of shape (T, H, d) (strided views allowed, last dim contiguous) and
cu_seqlens (B+1,) int32; both return out (T, H, d) contiguous in q's dtype.

"cpu": PyTorch's scaled_dot_product_attention in float32 over runs of consecutive images of equal length.
A run of G images of n tokens is a strided (G, H, n, d) view of q / k / v (no gather; in top-k mode every image
has the same length, so the batch is a few calls), cut into chunks of <= 2 MiB of float32 q, k, v so that the
upcast copies stay in cache. 16-bit inputs are upcast per chunk: the op's softmax is float32 and SDPA on 16-bit
CPU tensors rounds P to 16 bits (and was erratic, sometimes several times slower, on this CPU).

Why this one (measured on this project's 2-core AVX2 CPU, torch 2.14, B 64, H 6, d 64, medians of 7
interleaved runs, 1 and 2 threads): against one float32 SDPA call per image it is 1.1-1.4x faster on equal
lengths of 31 and 75 tokens and equal at 123, and within +-6% (slightly slower) on lengths jittered by +-12,
where runs are one image long. An earlier variant that gathered scattered equal-length images (index_select)
was 10-20% slower than per-image calls on jittered lengths; one call over a whole 64 x 123-token bfloat16
batch was 1.6x slower (the chunking above). A hand-written C++ kernel was not written: every variant runs at
~40-60% of this CPU's float32 matmul rate already (the reference's batched matmuls too), so the 2x-over-
reference target of C++ kernels is out of reach for attention here; benchmarks/bench_varlen_attention.py
--device cpu keeps the figures (cpu vs reference vs per-image SDPA).
"""

import torch
import torch.nn.functional as F

from .._triton_support import triton_device_types
from ._registry import register_backend

OP = "varlen_attention"


@register_backend(OP, "triton", triton_device_types)
def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """FlashAttention-style Triton forward; see spvit_kernels/triton/varlen_attention.py."""
    from ..triton.varlen_attention import varlen_attention_triton as fwd  # lazy: Triton only when used

    return fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


# float32 bytes of q, k, v per SDPA call: longer runs are split so that the upcast copies stay in cache (one
# call over a whole 64 x 123-token bfloat16 batch was 1.6x slower than per-image calls here).
_CHUNK_BYTES = 2 * 2**20


def _runs(bounds, max_bytes_per_row):
    """(first row, images G, length n) of runs of consecutive images of equal length, each run at most
    `_CHUNK_BYTES` of float32 q, k, v; empty images are skipped."""
    runs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if n == 0:
            continue
        if runs:
            first, G, m = runs[-1]
            if m == n and first + G * n == s and (G + 1) * n * max_bytes_per_row <= _CHUNK_BYTES:
                runs[-1] = (first, G + 1, n)
                continue
        runs.append((s, 1, n))
    return runs


@register_backend(OP, "cpu", lambda: {"cpu"})
def varlen_attention_cpu(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """float32 SDPA over runs of consecutive equal-length images (see the module docstring for why)."""
    T, H, d = q.shape
    out = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
    for first, G, n in _runs(cu_seqlens.tolist(), 3 * H * d * 4):  # a CPU tensor: no synchronisation
        # Rows first .. first + G*n are a (G, n, H, d) view of the strided input: no gather.
        rows = slice(first, first + G * n)
        qg, kg, vg = (t[rows].view(G, n, H, d).transpose(1, 2).float() for t in (q, k, v))
        og = F.scaled_dot_product_attention(qg, kg, vg, scale=softmax_scale)  # (G, H, n, d) float32
        out[rows].view(G, n, H, d).copy_(og.transpose(1, 2))
    return out
