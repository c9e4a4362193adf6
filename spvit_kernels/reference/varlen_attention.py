"""Reference attention over a ragged batch: image by image, softmax in float32 (float64 for float64)."""

import torch


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None):
    """See spvit_kernels.ops.varlen_attention. `softmax_scale` must already be resolved to a float."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qi, ki, vi = (t[start:end].to(cdt).transpose(0, 1) for t in (q, k, v))  # (H, n, d)
        p = torch.softmax((qi @ ki.transpose(1, 2)) * softmax_scale, dim=-1)
        out[start:end] = (p @ vi).transpose(0, 1).to(q.dtype)
    return out
