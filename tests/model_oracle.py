"""An independent SPViT forward for the model tests: it really drops tokens, image by image.

It shares nothing with spvit_kernels.models' forward except the modules' weights: no masks, no batched
decision, no masked block. For each image it keeps the short sequence [prefix rows, kept spatial tokens in
order, package tokens], scores it with the per-image reference `selector_rows`, decides with the reference
`keep_mask`, pools the dropped rows into a package row (appended; in "add" mode added to the one package
row after the first stage), and runs the unchanged timm blocks (their own forward) on the shorter sequence.
Final: the ViT's own forward_head on its own norm of the short sequence (timm pools "avg" over the rows
after the prefix, i.e. the kept patches and package rows; the distilled head averages its two heads;
LV-ViT's head sees the class row and the alive patches only).
"""

import torch

from spvit_kernels.reference import selector_rows
from spvit_kernels.reference.prune_pack import keep_mask


def _package_row(S, keep_prob, dropped, package):
    """Pool rows `dropped` (indices into S (M, C)) with keep_prob weights; returns (C,) in the accumulation
    dtype, or None for 'none'."""
    if package == "none":
        return None
    acc = torch.float64 if S.dtype == torch.float64 else torch.float32
    total = torch.zeros(S.shape[1], dtype=acc, device=S.device)
    wsum = torch.zeros((), dtype=acc, device=S.device)
    for i in dropped.tolist():  # a plain loop: deliberately unlike the model's einsum
        total = total + keep_prob[i].to(acc) * S[i].to(acc)
        wsum = wsum + keep_prob[i].to(acc)
    if package == "mean":
        total = total / wsum if (len(dropped) > 0 and wsum != 0) else torch.zeros_like(total)
    return total


@torch.no_grad()
def oracle_forward(model, images):
    """Returns (logits (B, classes), kept (list over stages of lists over images of sorted LongTensors),
    scores (list over stages of lists over images of the candidates' keep_score, in candidate order),
    candidates (same structure: the patch indices that were candidates))."""
    vit, cfg = model.vit, model.config
    H = vit.blocks[0].attn.num_heads
    n_pre = vit.num_prefix_tokens
    lvvit = hasattr(vit, "aux_head")  # LV-ViT: its head reads the class row and the alive patch rows
    stage_at = {layer: s for s, layer in enumerate(cfg.selector_layers)}
    S_count = len(cfg.selector_layers)
    kept = [[] for _ in range(S_count)]
    scores = [[] for _ in range(S_count)]
    cands = [[] for _ in range(S_count)]
    logits = []
    for b in range(images.shape[0]):
        # Stem through the ViT's own modules, one image at a time.
        if lvvit:
            seq = vit.embed(images[b: b + 1])[0]
        else:
            seq = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images[b: b + 1]))))[0]
        P = seq.shape[0] - n_pre
        patch_ids = torch.arange(P, device=seq.device)  # original patch number of each spatial row of seq
        n_pkg = 0
        for i, block in enumerate(vit.blocks):
            if i in stage_at:
                s = stage_at[i]
                rows = seq[n_pre:]  # [spatial, packages]
                score, prob = selector_rows(rows, H, *model.selectors[s].op_weights())
                n_sp = rows.shape[0] - n_pkg
                num_keep = int(round(cfg.keep_ratios[s] * P))
                keep = keep_mask(score[:n_sp], cfg.pruning, cfg.threshold_at(s), num_keep)
                scores[s].append(score[:n_sp].clone())
                cands[s].append(patch_ids.clone())
                kept_rows = torch.nonzero(keep).flatten()
                new_pkg = _package_row(rows, prob, torch.nonzero(~keep).flatten(), cfg.package)
                old_pkg = rows[n_sp:]
                if new_pkg is not None and cfg.package_merge == "add" and n_pkg == 1:
                    old_pkg = (old_pkg.to(new_pkg.dtype) + new_pkg).to(seq.dtype)  # the one package row
                elif new_pkg is not None:
                    old_pkg = torch.cat([old_pkg, new_pkg.to(seq.dtype)[None]])
                seq = torch.cat([seq[:n_pre], rows[kept_rows], old_pkg])
                n_pkg = old_pkg.shape[0]
                patch_ids = patch_ids[kept_rows]
                kept[s].append(patch_ids.clone())
            seq = block(seq[None])[0]
        if lvvit:  # the package rows are not patches: the backbone's own head on [cls, alive patches]
            logits.append(vit.forward_head(vit.norm(seq[None, : n_pre + len(patch_ids)]))[0])
        else:
            logits.append(vit.forward_head(vit.norm(seq[None]))[0])
    return torch.stack(logits), kept, scores, cands


def assert_reference_matches_oracle(model, images):
    """The reference `model` (float64) against oracle_forward: logits within 1e-10, kept sets equal at every
    stage for every image. Returns the model's return_info dict for further checks."""
    with torch.no_grad():
        logits, info = model(images, return_info=True)
    ref_logits, ref_kept, _, _ = oracle_forward(model, images)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-10)
    for s, stage in enumerate(ref_kept):
        for b, kept in enumerate(stage):
            assert torch.equal(info["kept_indices"][s][b], kept), f"stage {s} image {b}: kept sets differ"
    return info
