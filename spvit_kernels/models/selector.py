"""The SPViT token selector (design section 2, "Selector"): one per pruning location, heads share one MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._fusion import fused_gpu_tensor


def _linear(layer, t):
    # The selector computes in float32 (float64 for float64 tokens) whatever the model's dtype, like the ops.
    return F.linear(t, layer.weight.to(t.dtype), layer.bias.to(t.dtype))


class TokenSelector(nn.Module):
    """Scores tokens with the per-head MLP of SPViT plus the SE head-weighting branch.

    With d = dim / num_heads, the parameters are exactly those of design section 2:
        norm     LayerNorm(d, eps=1e-5)   per-head LayerNorm (affine)
        proj_in  Linear(d, d)             u = GELU(proj_in(norm(S_h)))
        mlp1     Linear(d, d/2)           on [u_local (d/2), global mean of u_global (d/2)]
        mlp2     Linear(d/2, d/4)
        mlp3     Linear(d/4, 2)           logits; index 0 = keep
        se1      Linear(H, H//2)          head weights w = sigmoid(se2(GELU(se1(per-head channel means))))
        se2      Linear(H//2, H)
    `score_masked` / `score_packed` score at inference; `train_scores` is the training form (weighted global
    mean, both log-softmax and softmax per row). Fresh weights follow the official initialisation.
    """

    def __init__(self, dim, num_heads, *, device=None, dtype=None):
        super().__init__()
        if num_heads < 2:
            raise ValueError(f"num_heads must be >= 2 (the SE branch has num_heads // 2 units), got {num_heads}")
        if dim % num_heads != 0:
            raise ValueError(f"num_heads = {num_heads} must divide dim = {dim}")
        d = dim // num_heads
        if d % 4 != 0:
            raise ValueError(f"num_heads: the head dim dim / num_heads = {d} must be a multiple of 4")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, d
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(d, eps=1e-5, **dd)
        self.proj_in = nn.Linear(d, d, **dd)
        self.mlp1 = nn.Linear(d, d // 2, **dd)
        self.mlp2 = nn.Linear(d // 2, d // 4, **dd)
        self.mlp3 = nn.Linear(d // 4, 2, **dd)
        self.se1 = nn.Linear(num_heads, num_heads // 2, **dd)
        self.se2 = nn.Linear(num_heads // 2, num_heads, **dd)
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation: Linear weights truncated normal (std 0.02, cut at +-2), zero biases,
        LayerNorm weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def op_weights(self):
        """The 14 weights in the argument order of `spvit_kernels.ops.token_scores`:
        (ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3, se_w1, se_b1, se_w2, se_b2)."""
        return (self.norm.weight, self.norm.bias, self.proj_in.weight, self.proj_in.bias,
                self.mlp1.weight, self.mlp1.bias, self.mlp2.weight, self.mlp2.bias,
                self.mlp3.weight, self.mlp3.bias, self.se1.weight, self.se1.bias, self.se2.weight, self.se2.bias)

    def score_packed(self, x, cu_seqlens, num_packages, backend=None):
        """Score a packed ragged batch through `spvit_kernels.ops.token_scores`.

        Args:
            x: (T, C) packed rows, image b = rows cu_seqlens[b] .. cu_seqlens[b+1]-1 laid out as
               [cls, alive spatial tokens, num_packages package tokens].
            cu_seqlens: (B+1,) int32.
            num_packages: package rows at the end of every image.
            backend: passed to the op (None = fastest for x's device).
        Returns:
            (keep_score, keep_prob), float32 of shape (T,); cls and package rows get +inf and 1.
        """
        return ops.token_scores(x, cu_seqlens, num_packages, self.num_heads, *self.op_weights(), backend=backend)

    def score_masked(self, S, rows):
        """Score the rows of a padded batch, the global mean taken over each image's `rows` only.

        Args:
            S: (B, M, C) every row of each image except cls (spatial rows, then package rows).
            rows: (B, M) bool, the rows that take part (alive spatial + package tokens); the others are
                scored too but do not enter the global mean, and their scores are meaningless.
        Returns:
            (keep_score, keep_prob), each (B, M), float32 (float64 for float64 S).
        """
        w, u = self._head_features(S)
        d = self.head_dim
        # Global half: mean over the image's participating rows. torch.where (not a product) so that a
        # non-finite value in a masked-out row cannot leak into the mean.
        part = rows[:, :, None, None]
        count = part.sum(dim=1, keepdim=True).clamp(min=1).to(u.dtype)
        glob = torch.where(part, u[..., d // 2:], 0).sum(dim=1, keepdim=True) / count  # (B, 1, H, d/2)
        score, prob = self._combine(w, u, glob)
        return score[..., 0] - score[..., 1], prob[..., 0]

    def train_scores(self, S, weights):
        """The training form (design section 8): the global mean weighted by the previous keep mask, with gradient.

        Args:
            S: (B, M, C) every row of each image after its prefix rows (spatial rows, then package rows).
            weights: (B, M) float, the previous keep mask m (1 for alive spatial rows and package rows, 0 for
                dropped ones; it may carry gradient): g = sum_i m_i u_i / sum_i m_i.
        Returns:
            (score, prob), each (B, M, 2) float32 (float64 for float64 S), index 0 = keep: the head-weighted
            log-softmax (what the Gumbel decision reads) and softmax (keep_prob = prob[..., 0]).
        On CUDA tokens (not float64) with Triton this runs as the fused op `spvit_kernels.ops.selector_train`
        (Triton forward and backward); elsewhere as the PyTorch code below.
        """
        if self._use_train_op(S):
            return ops.selector_train(S, weights.float(), self.num_heads, *self.op_weights())
        w, u = self._head_features(S)
        d = self.head_dim
        m = weights.to(u.dtype)[:, :, None, None]
        total = m.sum(dim=1, keepdim=True)
        # An image with no participating row (possible only without package rows) gets a zero global half.
        glob = (u[..., d // 2:] * m).sum(dim=1, keepdim=True) / total.clamp(min=torch.finfo(u.dtype).tiny)
        return self._combine(w, u, glob)

    def _use_train_op(self, S):
        """Whether the fused op (spvit_kernels.ops.selector_train, Triton forward and backward) serves train_scores:
        CUDA tokens other than float64, Triton present, a head dim its kernels take. Elsewhere the PyTorch form."""
        if not fused_gpu_tensor(S):
            return False
        from ..ops._validate import SELECTOR_TRAIN_TRITON_HEAD_DIMS

        if self.head_dim not in SELECTOR_TRAIN_TRITON_HEAD_DIMS:
            return False
        if any(p.dtype not in (torch.float32, S.dtype) or p.device != S.device for p in self.op_weights()):
            return False  # the op takes float32 weights or the tokens' dtype, on the tokens' device
        return "triton" in ops.available_backends("selector_train")

    def _head_features(self, S):
        """S (B, M, C) -> (head weights w (B, M, H), u = GELU(proj_in(norm(S_h))) (B, M, H, d)), computed in
        float32 (float64 for float64 S)."""
        cdt = torch.float64 if S.dtype == torch.float64 else torch.float32
        B, M, C = S.shape
        H, d = self.num_heads, self.head_dim
        Sh = S.to(cdt).view(B, M, H, d)
        # SE branch: per-head channel means -> per-row head weights (B, M, H).
        w = torch.sigmoid(_linear(self.se2, F.gelu(_linear(self.se1, Sh.mean(dim=-1)))))
        ln = F.layer_norm(Sh, (d,), self.norm.weight.to(cdt), self.norm.bias.to(cdt), eps=self.norm.eps)
        return w, F.gelu(_linear(self.proj_in, ln))

    def _combine(self, w, u, glob):
        """Per-head logits of [u_local, glob] combined with the head weights w -> (score, prob) (B, M, 2)."""
        B, M, H, d = u.shape
        z = torch.cat([u[..., : d // 2], glob.expand(B, M, H, d - d // 2)], dim=-1)
        logits = _linear(self.mlp3, F.gelu(_linear(self.mlp2, F.gelu(_linear(self.mlp1, z)))))  # (B, M, H, 2)
        wsum = w.sum(dim=-1, keepdim=True)
        score = (w.unsqueeze(-1) * F.log_softmax(logits, dim=-1)).sum(dim=2) / wsum
        prob = (w.unsqueeze(-1) * F.softmax(logits, dim=-1)).sum(dim=2) / wsum
        return score, prob
