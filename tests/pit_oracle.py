"""An independent SPViT-PiT forward for the tests: it really drops tokens, image by image.

It shares only the weights with spvit_kernels.models.pit: per image it keeps the short sequence [cls, kept
grid tokens in grid order, package row], scores it with the per-image reference `selector_rows`, decides
with the reference `keep_mask`, and writes each dropped token's value at drop time into a per-image grid
store (a dict keyed by grid position). At the end of a stage the kept tokens are written there too, the grid
is rebuilt from the store, and the next stage's pooling layer (timm's own `Pooling.forward`) maps the grid and
the [cls, package] rows. Logits: timm's own norm and forward_head on the class row.
"""

import torch

from spvit_kernels.reference import selector_rows
from spvit_kernels.reference.prune_pack import keep_mask

from .model_oracle import _package_row


@torch.no_grad()
def pit_oracle_forward(model, images):
    """Returns (logits (B, classes), kept: list over selectors of lists over images of sorted LongTensors of
    grid positions on that selector's stage grid)."""
    vit, cfg = model.vit, model.config
    layers = list(cfg.selector_layers)
    kept = [[] for _ in layers]
    logits = []
    for b in range(images.shape[0]):
        grid = vit.patch_embed(images[b: b + 1]) + vit.pos_embed
        cls, pkg = vit.cls_token[0], None  # (1, C), (1, C) or None
        layer = 0
        for t in vit.transformers:
            if t.pool is not None:
                grid, rows = t.pool(grid, cls[None] if pkg is None else torch.cat([cls, pkg])[None])
                cls, pkg = rows[0, :1], (rows[0, 1:] if pkg is not None else None)
            _, C, Hs, Ws = grid.shape
            P = Hs * Ws
            seq = t.norm(torch.cat([cls, grid[0].flatten(1).T] + ([pkg] if pkg is not None else [])))
            store = {}  # grid position -> value when dropped
            ids = list(range(P))
            for block in t.blocks:
                if layer in layers:
                    s = layers.index(layer)
                    heads = block.attn.num_heads
                    rows = seq[1:]
                    n_sp = len(ids)
                    score, prob = selector_rows(rows, heads, *model.selectors[s].op_weights())
                    keep = keep_mask(score[:n_sp], cfg.pruning, cfg.threshold_at(s),
                                     int(round(cfg.keep_ratios[s] * P)))
                    dropped = torch.nonzero(~keep).flatten()
                    for i in dropped.tolist():
                        store[ids[i]] = rows[i].clone()
                    new_pkg = _package_row(rows, prob, dropped, cfg.package)
                    pkg = new_pkg.to(seq.dtype)[None] if pkg is None else \
                        (rows[n_sp:].to(new_pkg.dtype) + new_pkg).to(seq.dtype)
                    kept_rows = torch.nonzero(keep).flatten()
                    ids = [ids[i] for i in kept_rows.tolist()]
                    kept[s].append(torch.tensor(ids, dtype=torch.int64))
                    seq = torch.cat([seq[:1], rows[kept_rows], pkg])
                seq = block(seq[None])[0]
                layer += 1
            for j, i in enumerate(ids):
                store[i] = seq[1 + j]
            cls = seq[:1]
            if pkg is not None:
                pkg = seq[1 + len(ids):]
            grid = torch.stack([store[i] for i in range(P)]).T.reshape(1, C, Hs, Ws)
        logits.append(vit.forward_head(vit.norm(cls[None]))[0])
    return torch.stack(logits), kept
