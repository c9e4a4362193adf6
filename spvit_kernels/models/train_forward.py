"""The pieces of SPViT's training forward (design section 8) that every model family shares.

Training runs the masked form: the full token tensor is kept, because the selector's gradient flows through the
dropped tokens' keys and values (policy attention) and through the package token. Per stage s:

    score, prob = selector.train_scores(S, m_prev)          global mean weighted by the previous keep mask
    keep = gumbel_keep(score of the spatial rows) * m_prev  Gumbel straight-through, ties keep
    drop = m_prev - keep                                    dropped at this stage (with gradient)
    package = sum_i prob_i drop_i S_i (/ sum_i prob_i drop_i for "mean"), appended or added
    later blocks attend with policy p = [1 (prefix), keep, 1 (package rows)]

With zero noise and train_attn_eps = 0 this is the inference forward with threshold 0 (up to scores of exactly 0).
"""

import torch
import torch.nn.functional as F

from ..training.output import TrainOutput  # noqa: F401  (re-exported for the model classes)
from ..training.policy_attention import policy_attention
from .add_norm import add_norm
from .fused_mlp import mlp_forward
from .timm_block import add_pending, attention_output, block_forward, blocks_forward_carried, qk_norm


def check_gumbel_noise(gumbel_noise, shapes):
    """gumbel_noise: None or a list / tuple of one tensor per stage, each broadcastable to shapes[s] = (B, P_s, 2).
    Returns a list (one entry per stage, None = draw); raises TypeError / ValueError naming gumbel_noise."""
    if gumbel_noise is None:
        return [None] * len(shapes)
    if not isinstance(gumbel_noise, (list, tuple)):
        raise TypeError(f"gumbel_noise must be a list of one tensor per stage, got {type(gumbel_noise).__name__}")
    if len(gumbel_noise) != len(shapes):
        raise ValueError(f"gumbel_noise must hold one tensor per stage: {len(gumbel_noise)} for {len(shapes)} stages")
    for s, (g, shape) in enumerate(zip(gumbel_noise, shapes)):
        if not torch.is_tensor(g) or not g.dtype.is_floating_point:
            raise TypeError(f"gumbel_noise[{s}] must be a float tensor, got {type(g).__name__}"
                            + (f" of {g.dtype}" if torch.is_tensor(g) else ""))
        try:
            fits = torch.broadcast_shapes(tuple(g.shape), shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"gumbel_noise[{s}] must broadcast to (B, P_s, 2) = {shape}, got {tuple(g.shape)}")
    return list(gumbel_noise)


def gumbel_keep(score, noise, tau):
    """The Gumbel straight-through keep decision of F.gumbel_softmax(score, tau, hard=True)[..., 0].

    Args:
        score: (B, P, 2) the head-weighted log-softmax scores (index 0 = keep).
        noise: None (draw -log(Exponential(1)), as F.gumbel_softmax does) or a tensor broadcastable to score.
        tau: the temperature.
    Returns:
        (B, P): 1 or 0 in value (the argmax; a tie keeps), the soft keep probability's gradient.
    """
    if noise is None:
        noise = -torch.empty_like(score, memory_format=torch.legacy_contiguous_format).exponential_().log()
    y = F.softmax((score + noise.to(score.device, score.dtype)) / tau, dim=-1)
    hard = (y[..., 0] >= y[..., 1]).to(y.dtype)
    return hard - y[..., 0].detach() + y[..., 0]


def pool_package_train(x, keep_prob, drop, package):
    """The training package token: sum_i keep_prob_i drop_i x_i over the spatial rows ("sum"), divided by
    sum_i keep_prob_i drop_i for "mean" (0 where that is 0). x (B, P, C); keep_prob, drop (B, P) with gradient.
    Accumulated in float32 (float64 for float64 x); returns (B, C) in that dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = keep_prob.to(acc) * drop.to(acc)
    pooled = torch.einsum("bp,bpc->bc", w, x.to(acc))
    if package == "mean":
        total = w.sum(dim=1, keepdim=True)
        nonzero = total != 0
        pooled = torch.where(nonzero, pooled / torch.where(nonzero, total, 1), 0)
    return pooled


def _policy_attention(policy, eps):
    def attention(attn, h):
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk_norm(attn, *qkv[:2].unbind(0))
        o = policy_attention(q, k, qkv[2], policy, eps, attn.scale)  # (B, H, N, d)
        return attention_output(attn, o.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim), h)

    return attention


def policy_block_forward(block, x, policy, eps):
    """A timm `Block` (train or eval mode: drop path and dropouts as the block is set) with policy attention.

    x (B, N, C); policy (B, N) float or None (all ones). Returns (B, N, C)."""
    return block_forward(block, x, _policy_attention(policy, eps))


def policy_blocks_forward(blocks, x, policy, eps):
    """policy_block_forward over consecutive blocks, with every residual add fused into the LayerNorm that reads
    it (models/add_norm.py) and GELU into the MLP's fc2 (models/fused_mlp.py): on CUDA with Triton, fused ops; on
    CPU the same PyTorch calls in the same order, so the result is bitwise that of the block-by-block loop."""
    x, pending = blocks_forward_carried(blocks, x, _policy_attention(policy, eps), add_norm, mlp_forward)
    return add_pending(x, pending)


def frozen_update(x, y, policy):
    """x + policy * (y - x): a row whose keep mask is 0 keeps its value (the rule of the families whose later
    layers read token positions, LV-ViT and PiT); None = every row takes y."""
    if policy is None:
        return y
    return x + policy[..., None].to(x.dtype) * (y - x)


def stage_policy(num_prefix, keep, num_packages):
    """The attention policy (B, num_prefix + P + num_packages): 1 for prefix and package rows, keep for patches."""
    B = keep.shape[0]
    return torch.cat([keep.new_ones(B, num_prefix), keep, keep.new_ones(B, num_packages)], dim=1)
