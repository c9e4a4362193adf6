"""A timm ViT block run on packed ragged rows: (T, C) tokens + cu_seqlens instead of (B, N, C).

LayerNorm, the qkv / proj Linears and the MLP act row by row, so they run on the packed rows unchanged
(no padding). Only attention mixes rows; it runs through `varlen_attention` on strided views of the
qkv Linear's output, so q, k, v are never copied.
"""

import torch


def packed_attention(attn, x, cu_seqlens, max_seqlen):
    """timm `Attention` on packed rows x (T, C) -> (T, C)."""
    T = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).view(T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)  # (T, H, d) views of the packed qkv, last dim contiguous
    # q_norm / k_norm / norm are Identity unless configured; older timm releases lack some of them.
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    out = torch.ops.spvit.varlen_attention(q, k, v, cu_seqlens, max_seqlen, float(attn.scale))
    out = out.reshape(T, attn.num_heads * attn.head_dim)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def packed_block(block, x, cu_seqlens, max_seqlen):
    """timm `Block` (pre-norm, layer scale, drop path) on packed rows x (T, C) -> (T, C)."""
    x = x + block.drop_path1(block.ls1(packed_attention(block.attn, block.norm1(x), cu_seqlens, max_seqlen)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
