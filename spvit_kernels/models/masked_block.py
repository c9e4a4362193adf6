"""A timm ViT block run with attention keys masked per image: the official SPViT masked form."""

import torch
import torch.nn.functional as F


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
    attn = block.attn
    B, N, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Identity unless qk_norm; absent in older timm
        q, k = attn.q_norm(q), attn.k_norm(k)
    if bias.dtype != q.dtype:  # under autocast q may be half while the tokens are float32
        bias = bias.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    o = o.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    # Optional parts of newer timm Attention (scale_norm, gating); absent or identity in DeiT.
    norm = getattr(attn, "norm", None)
    if norm is not None:
        o = norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    # drop_path is the identity in eval mode; ls1 / ls2 are LayerScale or Identity.
    x = x + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
