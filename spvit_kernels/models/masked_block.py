"""A timm ViT block run with attention keys masked per image: the official SPViT masked form."""

import torch
import torch.nn.functional as F

from .timm_block import attention_output, block_forward, qk_norm


def check_block(block, index):
    """Raise ValueError unless `block` is a timm `Block` with a timm `Attention` whose forwards are timm's,
    i.e. unless `masked_block_forward` reproduces it exactly."""
    from timm.models.vision_transformer import Attention, Block

    if not isinstance(block, Block) or type(block).forward is not Block.forward:
        raise ValueError(f"vit: blocks[{index}] is a {type(block).__name__}; only timm's plain "
                         f"vision_transformer.Block is supported")
    attn = getattr(block, "attn", None)
    if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
        raise ValueError(f"vit: blocks[{index}].attn is a {type(attn).__name__}; only timm's Attention is supported")


def attention_bias(keys, dtype):
    """Additive attention mask (B, 1, N, N) of `dtype`: 0 where query row i may attend to key row j, i.e.
    j in `keys` (B, N) bool (cls + alive + package tokens) or j == i, else -inf. Every row sees at least
    itself, so no softmax row is empty and the rows outside `keys` (dropped tokens) stay finite.
    Built once per pruning stage; an additive float mask is also what SDPA handles fastest (a bool mask
    is converted on every call)."""
    B, N = keys.shape
    eye = torch.eye(N, dtype=torch.bool, device=keys.device)
    allowed = keys[:, None, :] | eye  # (B, N queries, N keys)
    bias = torch.zeros(B, 1, N, N, dtype=dtype, device=keys.device)
    return bias.masked_fill_(~allowed[:, None], float("-inf"))


def masked_block_forward(block, x, bias):
    """One timm `Block` in eval mode with an additive attention mask.

    Args:
        block: a timm vision_transformer.Block (see `check_block`).
        x: (B, N, C) tokens.
        bias: (B, 1, N, N) from `attention_bias`, x's dtype.
    Returns:
        (B, N, C): the block's output; for the rows in the mask's `keys` it equals the block run on
        those rows alone.
    """
    return block_forward(block, x, lambda attn, h: _masked_attention(attn, h, bias))


def _masked_attention(attn, h, bias):
    B, N, _ = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qk_norm(attn, *qkv[:2].unbind(0))  # (B, heads, N, head_dim)
    if bias.dtype != q.dtype:  # under autocast q may be half while the tokens are float32
        bias = bias.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=bias, scale=attn.scale)
    return attention_output(attn, o.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim), h)
