"""Reference per-head token scoring (design section 2, "Selector")."""

import torch
import torch.nn.functional as F


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def selector_rows(S, num_heads, ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3,
                  se_w1, se_b1, se_w2, se_b2):
    """Score the M rows S (M, C) of ONE image (its rows without the prefix rows) in S's dtype.

    Returns (keep_score, keep_prob), each of shape (M,). The global mean is taken over all M rows.
    """
    M, C = S.shape
    H = num_heads
    d = C // H
    cast = lambda t: t.to(S.dtype)  # noqa: E731
    Sh = S.view(M, H, d)
    # SE branch: per-head channel means -> per-row head weights.
    hbar = Sh.mean(dim=-1)
    w = torch.sigmoid(F.linear(F.gelu(F.linear(hbar, cast(se_w1), cast(se_b1))), cast(se_w2), cast(se_b2)))
    # Per head: LayerNorm over the head's d channels, projection, local half + image-global half.
    u = F.gelu(F.linear(F.layer_norm(Sh, (d,), cast(ln_weight), cast(ln_bias), eps=1e-5), cast(w_in), cast(b_in)))
    local = u[..., : d // 2]
    glob = u[..., d // 2:].mean(dim=0, keepdim=True).expand(M, H, d - d // 2)
    z = torch.cat([local, glob], dim=-1)
    h = F.gelu(F.linear(z, cast(w1), cast(b1)))
    h = F.gelu(F.linear(h, cast(w2), cast(b2)))
    logits = F.linear(h, cast(w3), cast(b3))  # (M, H, 2); index 0 = keep
    wsum = w.sum(dim=-1, keepdim=True)
    score = (w.unsqueeze(-1) * F.log_softmax(logits, dim=-1)).sum(dim=1) / wsum
    prob = (w.unsqueeze(-1) * F.softmax(logits, dim=-1)).sum(dim=1) / wsum
    return score[:, 0] - score[:, 1], prob[:, 0]


def token_scores_reference(x, cu_seqlens, num_packages, num_heads, ln_weight, ln_bias, w_in, b_in, w1, b1,
                           w2, b2, w3, b3, se_w1, se_b1, se_w2, se_b2, num_prefix=1):
    """See spvit_kernels.ops.token_scores. Image by image, in float32 (float64 for float64 x)."""
    T = x.shape[0]
    cdt = _compute_dtype(x)
    keep_score = torch.full((T,), float("inf"), dtype=torch.float32, device=x.device)
    keep_prob = torch.ones((T,), dtype=torch.float32, device=x.device)
    bounds = cu_seqlens.tolist()
    weights = (ln_weight, ln_bias, w_in, b_in, w1, b1, w2, b2, w3, b3, se_w1, se_b1, se_w2, se_b2)
    for start, end in zip(bounds[:-1], bounds[1:]):
        first = start + num_prefix  # S: every row after the prefix rows (candidates, then packages)
        rows = x[first:end].to(cdt)
        n_spatial = rows.shape[0] - num_packages
        if n_spatial <= 0:
            continue  # only prefix and package rows: nothing to score
        score, prob = selector_rows(rows, num_heads, *weights)
        keep_score[first: first + n_spatial] = score[:n_spatial].float()
        keep_prob[first: first + n_spatial] = prob[:n_spatial].float()
    return keep_score, keep_prob
