"""A timm ViT block run on packed ragged rows: (T, C) tokens + cu_seqlens instead of (B, N, C).

LayerNorm, the qkv / proj Linears and the MLP act row by row, so they run on the packed rows unchanged
(no padding). Only attention mixes rows; it runs through `varlen_attention` on strided views of the
qkv Linear's output, so q, k, v are never copied.
"""

import torch

from ..models.timm_block import attention_output, block_forward, qk_norm


def packed_attention(attn, x, cu_seqlens, max_seqlen):
    """timm `Attention` on packed rows x (T, C) -> (T, C)."""
    T = x.shape[0]
    qkv = attn.qkv(x).view(T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)  # (T, H, d) views of the packed qkv, last dim contiguous
    q, k = qk_norm(attn, q, k)
    out = torch.ops.spvit.varlen_attention(q, k, v, cu_seqlens, max_seqlen, float(attn.scale))
    return attention_output(attn, out.reshape(T, attn.num_heads * attn.head_dim), x)


def packed_block(block, x, cu_seqlens, max_seqlen):
    """timm `Block` (pre-norm, layer scale, drop path) on packed rows x (T, C) -> (T, C)."""
    return block_forward(block, x, lambda attn, h: packed_attention(attn, h, cu_seqlens, max_seqlen))
