"""The SPViT training step as the paper code writes it, on this library's model objects (same modules, weights and
training forward), for the side-by-side training-step benchmark.

The official code (vit_l2_3keep_senet.py) computes the same function in two places differently:
  * attention: `softmax_with_policy` materialises an N x N eye matrix and the (B, 1, N, N) policy and runs in plain
    PyTorch autograd on q, k, v cast to float32 (= `policy_attention_reference`);
  * selector: `MultiheadPredictorLG` loops over the heads in Python, running the shared per-head MLP on each
    head's channel slice, and accumulates the head-weighted softmax and log-softmax.
`paper_form()` swaps those two pieces into the library's training forward for the duration of a `with` block;
everything else (Gumbel decision, package token, blocks, head, loss) is the same code in both providers, so the
benchmark times exactly the difference.
"""

import contextlib

import torch
import torch.nn.functional as F

from spvit_kernels.models import train_forward
from spvit_kernels.models.selector import TokenSelector
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


@contextlib.contextmanager
def paper_form():
    """Within the block, SPViT's training forward runs the paper code's attention and selector forms."""
    saved = train_forward.policy_attention, TokenSelector.train_scores
    train_forward.policy_attention = policy_attention_reference
    TokenSelector.train_scores = paper_train_scores
    try:
        yield
    finally:
        train_forward.policy_attention, TokenSelector.train_scores = saved
