"""Per-stage thresholds for threshold pruning, calibrated so that the mean keep matches the keep ratios.

Threshold pruning keeps a patch iff its keep_score > threshold, so how many patches survive depends on the
weights and the images. To compare it with top-k pruning at the same cost (the throughput benchmark does),
`calibrate_thresholds` picks, stage after stage, the threshold under which the calibration images keep on
average the same number of patches as top-k would: round(keep_ratios[s] * P) per image after stage s.
Stages are calibrated in order because stage s scores the tokens that the (already calibrated) earlier
stages left alive.
"""

import dataclasses

import torch

from .spvit import SPViT


def _threshold_for(scores, target):
    """A threshold t such that exactly `target` of the finite `scores` (1-D) are > t, placed halfway between
    neighbouring scores so that rounding noise does not move the count. target in [0, len(scores)]."""
    ranked = torch.sort(scores.double(), descending=True).values
    if len(ranked) == 0:  # no candidate left (an earlier stage kept nothing): any threshold will do
        return 0.0
    if target <= 0:
        return float(ranked[0]) + 1.0
    if target >= len(ranked):
        return float(ranked[-1]) - 1.0
    return float((ranked[target - 1] + ranked[target]) / 2)


@torch.no_grad()
def calibrate_thresholds(model, images, keep_ratios=None):
    """Set `model.config.threshold` to per-stage thresholds under which `images` keep, on average over the
    images, round(keep_ratios[s] * P) patches after stage s, and return them.

    Args:
        model: an SPViT model (reference or accelerated; in eval mode). Its pruning mode is left as it is:
            the thresholds take effect in "threshold" mode.
        images: (B, in_chans, H, W) calibration images (ideally not the images later measured).
        keep_ratios: cumulative keep ratios, one per stage; default: model.config.keep_ratios.
    Returns:
        tuple of floats, one threshold per stage (also stored in model.config).

    Ties and NaN: NaN scores are never kept; when equal scores straddle the target the count may differ
    from it by the number of tied scores.

    Raises:
        ValueError: images of the wrong shape, a batch of 0 images, or images whose candidates all score NaN
            at some stage (e.g. all-NaN images): nothing to calibrate on.
    """
    if not isinstance(model, SPViT):
        raise TypeError(f"model must be an SPViT model from spvit_kernels.models, got {type(model).__name__}")
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"images must be a (B, in_chans, H, W) tensor, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if images.shape[0] == 0:
        raise ValueError("images: a batch of 0 images cannot calibrate thresholds")
    model.check_images(images)
    cfg = model.config
    # The target counts are top-k's under these ratios; the model's own config rules validate them (DeiT:
    # one per selector, decreasing, in (0, 1]; PiT: per stage, each relative to its stage's grid) before
    # the model is touched.
    target = model.validated_config(pruning="topk", selector_layers=cfg.selector_layers,
                                    keep_ratios=cfg.keep_ratios if keep_ratios is None else keep_ratios,
                                    package=cfg.package, package_merge=cfg.package_merge)
    thresholds = [cfg.threshold_at(s) for s in range(cfg.num_stages)]
    # Calibration needs the threshold decision at the earlier stages whatever the model's mode.
    model.config = dataclasses.replace(cfg, pruning="threshold", threshold=tuple(thresholds))
    try:
        for s in range(cfg.num_stages):
            keep_score, candidates = model.stage_scores(images, s)
            B, P = keep_score.shape
            scores = keep_score[candidates & ~torch.isnan(keep_score)]  # NaN is never kept anyway
            if scores.numel() == 0 and bool(candidates.any()):
                raise ValueError(f"images: every keep score at stage {s} is NaN (NaN images or weights?); "
                                 "no threshold can be calibrated on them")
            thresholds[s] = _threshold_for(scores.cpu(), target.num_keep(s, P) * B)
            model.config = dataclasses.replace(model.config, threshold=tuple(thresholds))
    except BaseException:
        model.config = cfg
        raise
    model.config = dataclasses.replace(cfg, threshold=tuple(thresholds))
    return tuple(thresholds)
