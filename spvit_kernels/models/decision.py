"""Batched keep decision and package-token pooling of the masked reference model (design section 2).

These are the (B, P)-tensor forms of `spvit_kernels.reference.prune_pack.keep_mask` and of the
reference package pooling, written without a per-image Python loop or a host synchronisation so the
reference model is not made artificially slow on a GPU. The tests check them against the per-image
reference functions (ties, NaN, empty candidate sets).
"""

import torch


def keep_decision(keep_score, candidates, pruning, threshold, num_keep):
    """Which candidate patches each image keeps.

    Args:
        keep_score: (B, P) float scores of the spatial tokens (values outside `candidates` are ignored).
        candidates: (B, P) bool, the spatial tokens still alive (the only ones that can be kept).
        pruning: "threshold" (keep iff keep_score > threshold; NaN never) or "topk" (the num_keep best
            candidates; ties to the lower index; NaN ranks lowest; all of them if there are fewer).
        threshold: float, for "threshold".
        num_keep: int, for "topk".
    Returns:
        keep: (B, P) bool, a subset of `candidates`.
    """
    if pruning == "threshold":
        return candidates & (keep_score > threshold)  # NaN compares False
    B, P = keep_score.shape
    nan = torch.isnan(keep_score)
    filled = torch.where(nan, torch.full_like(keep_score, float("-inf")), keep_score)
    # Rank classes: 0 = a number (incl. -inf), 1 = NaN, 2 = not a candidate. Stable sorts compose, the
    # last one being the primary key: by score (descending, ties keep index order), then by class.
    rank_class = torch.where(candidates, nan.to(torch.int8), torch.full_like(nan, 2, dtype=torch.int8))
    order = torch.sort(filled, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(rank_class.gather(1, order), dim=1, stable=True).indices)
    k = candidates.sum(dim=1).clamp(max=num_keep)  # (B,)
    take = torch.arange(P, device=keep_score.device)[None, :] < k[:, None]  # the first k of each order
    return torch.zeros_like(candidates).scatter(1, order, take)


def pool_package(x, keep_prob, dropped, package, dtype=None):
    """The package token of one stage: the tokens dropped at that stage pooled with keep_prob weights.

    Args:
        x: (B, P, C) spatial tokens.
        keep_prob: (B, P) float weights.
        dropped: (B, P) bool, the tokens dropped at this stage.
        package: "sum" (sum of keep_prob * x) or "mean" (that divided by the sum of the weights; a zero
            vector when nothing was dropped or the weights sum to 0).
        dtype: the result's dtype; None = x's dtype. The 1x package mode asks for the accumulation
            dtype so that the merge with the old package row rounds once, as prune_pack does.
    Returns:
        (B, C), accumulated in float32 (float64 for float64 x).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = torch.where(dropped, keep_prob.to(acc), 0)
    # Masking x too (not only the weight) keeps a non-finite kept row out of the sum (0 * inf = NaN).
    xs = torch.where(dropped[..., None], x.to(acc), 0)
    pooled = torch.einsum("bp,bpc->bc", w, xs)
    if package == "mean":
        total = w.sum(dim=1, keepdim=True)
        nonzero = total != 0
        pooled = torch.where(nonzero, pooled / torch.where(nonzero, total, 1), 0)
    return pooled.to(x.dtype if dtype is None else dtype)
