"""The SPViT training step as the paper code writes it, on this library's model objects (same modules, weights and
training forward), for the side-by-side training-step benchmark.

The official code (vit_l2_3keep_senet.py) computes the same function in two places differently:
  * attention: `softmax_with_policy` materialises an N x N eye matrix and the (B, 1, N, N) policy and runs in plain
    PyTorch autograd on q, k, v cast to float32 (= `policy_attention_reference`);
  * selector: `MultiheadPredictorLG` loops over the heads in Python, running the shared per-head MLP on each
    head's channel slice, and accumulates the head-weighted softmax and log-softmax.
  * teacher: VisionTransformerTeacher runs the same Attention without a policy: q, k, v cast to float32, the
    B x H x N x N scores materialised, softmax, (attn @ v) transposed and copied (`paper_teacher_attention`), where
    timm's Attention calls scaled_dot_product_attention.
`paper_form()` swaps those three pieces in (the library's training forward; timm's Attention.forward, which only
the teacher calls: the student's blocks call attn.qkv and the attention op themselves) for the duration of a
`with` block; everything else (Gumbel decision, package token, blocks, head, loss) is the same code in both
providers, so the benchmark times exactly the difference.
"""

import contextlib

import torch
import torch.nn.functional as F

from timm.models.vision_transformer import Attention

from spvit_kernels.models import train_forward
from spvit_kernels.models.selector import TokenSelector
from spvit_kernels.models.timm_block import attention_output, qk_norm
from spvit_kernels.training import policy_attention_reference


def paper_train_scores(sel, S, weights):
    """TokenSelector.train_scores written head by head, as MultiheadPredictorLG computes it."""
    B, M, C = S.shape
    H, d = sel.num_heads, sel.head_dim
    x = S.float() if S.dtype != torch.float64 else S
    m = weights.to(x.dtype)[..., None]                                           # (B, M, 1)
    head_means = torch.stack([x[..., h * d:(h + 1) * d].mean(-1) for h in range(H)], -1)  # the pooling to H
    w = torch.sigmoid(sel.se2(F.gelu(sel.se1(head_means))))                      # (B, M, H)
    score = prob = 0
    for h in range(H):
        u = F.gelu(sel.proj_in(sel.norm(x[..., h * d:(h + 1) * d])))
        glob = (u[..., d // 2:] * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True)
        z = torch.cat([u[..., : d // 2], glob.expand(B, M, d - d // 2)], dim=-1)
        logits = sel.mlp3(F.gelu(sel.mlp2(F.gelu(sel.mlp1(z)))))
        prob = prob + F.softmax(logits, dim=-1) * w[..., h:h + 1]
        score = score + F.log_softmax(logits, dim=-1) * w[..., h:h + 1]
    wsum = w.sum(dim=2, keepdim=True)
    return score / wsum, prob / wsum


_timm_attention_forward = Attention.forward


def paper_teacher_attention(attn, x, *args, **kwargs):
    """timm Attention.forward as the paper code's Attention computes it without a policy (its teacher): q, k, v
    cast to float32 (under autocast the matmuls cast them back), the scores materialised, softmax (float32 under
    autocast), attn @ v transposed and copied to (B, N, C). A mask or other arguments: timm's own forward."""
    if args or kwargs:
        return _timm_attention_forward(attn, x, *args, **kwargs)
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qk_norm(attn, *qkv[:2].unbind(0))
    q, k, v = q.float(), k.float(), qkv[2].float()
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return attention_output(attn, (a @ v).transpose(1, 2).reshape(B, N, -1), x)


@contextlib.contextmanager
def paper_form():
    """Within the block, SPViT's training forward runs the paper code's attention and selector forms, and the
    teacher's timm attention the paper code's teacher form."""
    saved = train_forward.policy_attention, TokenSelector.train_scores, Attention.forward
    train_forward.policy_attention = policy_attention_reference
    TokenSelector.train_scores = paper_train_scores
    Attention.forward = paper_teacher_attention
    try:
        yield
    finally:
        train_forward.policy_attention, TokenSelector.train_scores, Attention.forward = saved
