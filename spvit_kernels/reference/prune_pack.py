"""Reference keep decision + gather + package-token pooling (design section 2, "Decision", "Package token")."""

import torch


def topk_order(scores):
    """Indices of `scores` (1-D) from best to worst: higher first, ties to the lower index, NaN last."""
    idx = torch.arange(scores.shape[0], device=scores.device)
    nan = torch.isnan(scores)
    filled = torch.where(nan, torch.full_like(scores, float("-inf")), scores)
    # Stable sorts compose: the last key sorted is the primary one.
    order = idx[torch.sort(filled, descending=True, stable=True).indices]
    return order[torch.sort(nan[order].to(torch.int8), stable=True).indices]


def keep_mask(scores, mode, threshold, num_keep):
    """Boolean keep mask over one image's candidate scores."""
    if mode == "threshold":
        return scores > threshold  # NaN compares False: never kept
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    keep[topk_order(scores)[: min(num_keep, scores.shape[0])]] = True
    return keep


def prune_pack_reference(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold=0.0,
                         num_keep=None, package="mean", total_rows=None, package_merge="concat", num_prefix=1):
    """See spvit_kernels.ops.prune_pack. Image by image; the package row is pooled (and in "add" mode
    merged with the old one) in float32 (float64 for float64 x). `total_rows` is accepted for the backend
    interface and cross-checked."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    bounds = cu_seqlens.tolist()
    pieces, sources, out_lengths = [], [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        first, pkg = start + num_prefix, end - num_packages  # candidates are rows [first, pkg)
        keep = keep_mask(keep_score[first:pkg], mode, threshold, num_keep)
        kept = first + torch.nonzero(keep).flatten()
        merge = package_merge == "add" and num_packages > 0  # the old package row is replaced by the sum
        old = torch.arange(pkg, pkg if merge else end, device=x.device)
        src = torch.cat([torch.arange(start, first, device=x.device), kept, old])
        pieces.append(x[src])
        if package != "none":
            dropped = first + torch.nonzero(~keep).flatten()
            w = keep_prob[dropped].to(acc)
            pooled = (w[:, None] * x[dropped].to(acc)).sum(dim=0)
            if package == "mean":
                total = w.sum()
                pooled = pooled / total if (dropped.numel() > 0 and total != 0) else torch.zeros_like(pooled)
            if merge:
                pooled = pooled + x[pkg].to(acc)
            pieces.append(pooled.to(x.dtype)[None])
            src = torch.cat([src, torch.tensor([-1], device=x.device)])
        sources.append(src)
        out_lengths.append(src.shape[0])
    x_out = torch.cat(pieces) if pieces else x.new_empty((0, x.shape[1]))
    src_index = torch.cat(sources).to(torch.int64)
    cu_out = torch.zeros(len(out_lengths) + 1, dtype=torch.int32)
    cu_out[1:] = torch.tensor(out_lengths, dtype=torch.int64).cumsum(0)
    if mode == "topk":
        # The size is fixed by the shapes: rows no image owns (images with fewer than num_keep candidates)
        # are zero, with src_index -1.
        most = max(x.shape[0] - len(out_lengths) * (num_prefix + num_packages), 0)
        package_rows = 1 if package_merge == "add" else num_packages + (package != "none")
        rows = len(out_lengths) * (num_prefix + package_rows + min(num_keep, most))
        if total_rows is not None and total_rows != rows:
            raise ValueError(f"total_rows = {total_rows}, but top-k mode gives {rows} rows")
        pad = rows - x_out.shape[0]
        x_out = torch.cat([x_out, x_out.new_zeros((pad, x.shape[1]))])
        src_index = torch.cat([src_index, src_index.new_full((pad,), -1)])
    return x_out, cu_out.to(x.device), src_index
