"""SPViT on timm's Pooling-based ViT (PiT-Ti / XS / S): the masked reference model (design section 5).

PiT runs its blocks in stages; between stages a pooling layer halves the token grid (a depthwise conv on
the grid) and maps the class row with a Linear (`fc`). SPViT-PiT puts at most one selector in a stage
(default: before stage block 1, 3 and 2 of stages 0, 1, 2, i.e. global blocks 1, 5, 10) and uses the 1x
package mode (package_merge="add": one package row per image, the keep_prob-weighted mean of the dropped
tokens, added to the existing package row at later stages).

Token sequence of a stage: [cls, the stage's grid tokens in row-major grid order, package row (from the
first selector on)]. Inside a stage the selector prunes as in SPViT; the masked reference keeps the full
tensor, masks attention keys and keeps every dropped row frozen at the value it had when it was dropped
(the frozen-value rule). At the stage's end the grid rows (alive ones with their current values, dropped
ones frozen) go back to the grid; the next stage's pooling layer runs its conv on that grid and its `fc`
on [cls, package] rows; then every grid token is alive again. Keep ratios are per stage, relative to that
stage's grid (so they need not decrease from stage to stage). The head reads the class row only.
"""

import dataclasses

import torch
from torch import nn

from .config import make_config, split_config_kwargs
from .masked_block import attention_bias, check_block, masked_block_forward
from .selector import TokenSelector
from .spvit import SPViT
from .train_forward import TrainOutput, check_gumbel_noise, stage_policy

# name -> timm builder; the shapes are timm's pit_{ti,xs,s}_224.
PIT_MODELS = {"spvit_pit_ti": "pit_ti_224", "spvit_pit_xs": "pit_xs_224", "spvit_pit_s": "pit_s_224"}
# The stage block each selector sits before, as global block indices of timm's depths (2, 6, 4).
PIT_SELECTOR_LAYERS = (1, 5, 10)
# Default keep ratio of each stage, relative to the stage's own grid: the seed's phase rates (pruning 0.383,
# 0.631, 0.863), which the official training code hard-codes (its --base_rate flag is never read).
PIT_KEEP_RATIOS = (0.617, 0.369, 0.137)


def stage_bounds(vit):
    """[(first global block, number of blocks)] of each stage of a timm PoolingVisionTransformer."""
    bounds, start = [], 0
    for t in vit.transformers:
        bounds.append((start, len(t.blocks)))
        start += len(t.blocks)
    return bounds


def stage_of_layer(bounds, layer):
    """The stage whose blocks hold global block `layer`, for `bounds` from `stage_bounds`."""
    return next(s for s, (start, n) in enumerate(bounds) if start <= layer < start + n)


def make_pit_config(vit, *, pruning="topk", keep_ratios=PIT_KEEP_RATIOS, selector_layers=PIT_SELECTOR_LAYERS,
                    package="mean", threshold=0.0, package_merge="add", **training):
    """Validate a pruning configuration for the PiT `vit` and return it (an SPViTConfig).

    Beyond `make_config`'s checks: package_merge must be "add" (one package row carried through pooling),
    every stage holds at most one selector, a selector of a later stage may not sit before its stage's
    first block (the pooling boundary), and keep ratios lie in (0, 1] without having to decrease across
    stages (each is relative to its own stage's grid). Raises ValueError / TypeError naming the field."""
    if package_merge != "add":
        raise ValueError(f'package_merge must be "add" for PiT (one package row goes through each pooling '
                         f'layer), got {package_merge!r}')
    bounds = stage_bounds(vit)
    depth = sum(n for _, n in bounds)
    try:
        ratios = tuple(float(r) for r in keep_ratios)
    except (TypeError, ValueError):
        raise TypeError(f"keep_ratios must be a sequence of reals, got {keep_ratios!r}") from None
    # make_config checks everything but the cross-stage order of the ratios: give it a decreasing stand-in
    # of the right length, then put the real (per-stage) ratios in.
    stand_in = tuple(1.0 / (i + 1) for i in range(len(ratios)))
    config = make_config(depth, pruning=pruning, keep_ratios=stand_in, selector_layers=selector_layers,
                         package=package, threshold=threshold, package_merge=package_merge, **training)
    for r in ratios:
        if not 0.0 < r <= 1.0:  # also rejects NaN
            raise ValueError(f"keep_ratios must lie in (0, 1], got {r}")
    seen = set()
    for layer in config.selector_layers:
        stage = stage_of_layer(bounds, layer)
        if stage in seen:
            raise ValueError(f"selector_layers: stage {stage} has more than one selector; SPViT-PiT supports "
                             f"one per stage (stage block ranges {bounds})")
        if stage > 0 and layer == bounds[stage][0]:
            raise ValueError(f"selector_layers: block {layer} is the first block of stage {stage}, on the pooling "
                             "boundary; put the selector before a later block of the stage")
        seen.add(stage)
    return dataclasses.replace(config, keep_ratios=ratios)


def check_pit(vit):
    """Raise TypeError / ValueError unless `vit` is a non-distilled timm PoolingVisionTransformer with a token
    head, plain timm blocks and selector-compatible heads in every stage."""
    from timm.models.pit import PoolingVisionTransformer

    if not isinstance(vit, PoolingVisionTransformer):
        raise TypeError(f"vit must be a timm PoolingVisionTransformer, got {type(vit).__name__}")
    if vit.num_tokens != 1 or getattr(vit, "head_dist", None) is not None:
        raise ValueError("vit: distilled PiT (a distillation token) is not supported; use pit_*_224")
    if vit.global_pool != "token":
        raise ValueError(f"vit.global_pool is {vit.global_pool!r}; SPViT-PiT needs 'token'")
    for s, t in enumerate(vit.transformers):
        for j, block in enumerate(t.blocks):
            check_block(block, f"{s}.{j}")
        H = t.blocks[0].attn.num_heads
        C = H * t.blocks[0].attn.head_dim
        if H < 2 or (C // H) % 4 != 0:
            raise ValueError(f"vit: stage {s} has {H} heads of dim {C // H}; the selector needs >= 2 heads and a "
                             "head dim that is a multiple of 4")


class SPViTPiT(SPViT):
    """SPViT on a timm PoolingVisionTransformer (model.vit). Same interface as SPViT: `model(images)` ->
    logits, `model(images, return_info=True)` -> (logits, info); info["kept_indices"][s][b] are the patches
    of stage s's own grid (row-major, 0 .. H_s * W_s - 1) image b keeps after selector s, and
    info["grid_sizes"] the (H_s, W_s) of the grid each selector prunes."""

    def __init__(self, vit, selectors, config):
        # Not SPViT.__init__: it reads one head count and width from vit.blocks, which PiT's stages lack.
        nn.Module.__init__(self)
        self.vit = vit
        self.selectors = nn.ModuleList(selectors)
        self.config = config
        self.num_prefix = 1  # the class token; the package row comes last
        self.head_kind = "token"
        self.stages = stage_bounds(vit)
        # (stage, the stage block a selector sits before) -> the selector's index s
        self.selector_at = {}
        for s, layer in enumerate(config.selector_layers):
            stage = stage_of_layer(self.stages, layer)
            self.selector_at[(stage, layer - self.stages[stage][0])] = s
        self.num_heads = None  # differs per stage: each selector has its stage's (selectors[s].num_heads)

    def extra_repr(self):
        c = self.config
        return (f"pruning={c.pruning!r}, keep_ratios={c.keep_ratios}, selector_layers={c.selector_layers}, "
                f"package={c.package!r}, package_merge={c.package_merge!r}, threshold={c.threshold}, "
                f"stages={self.stages}")

    def validated_config(self, **fields):
        """`fields` validated by make_pit_config (per-stage ratios, one selector per stage, "add" mode)."""
        return make_pit_config(self.vit, **fields)

    def forward_stem(self, images):
        """images -> (grid (B, C0, H0, W0) with position embedding, class row (B, 1, C0))."""
        vit = self.vit
        grid = vit.pos_drop(vit.patch_embed(images) + vit.pos_embed.to(images.dtype))
        return grid, vit.cls_token.expand(grid.shape[0], -1, -1).to(grid.dtype)

    def pool_stage_input(self, stage, grid, rows):
        """Enter `stage`: its pooling layer (none for stage 0) on grid (B, C, H, W) (conv) and on the prefix +
        package rows (B, r, C) (fc). Returns (grid, rows) of the stage's width."""
        pool = self.vit.transformers[stage].pool
        if pool is None:
            return grid, rows
        return pool.conv(grid), pool.fc(rows)

    def forward_head_from_cls(self, cls):
        """Final class rows (B, C) -> logits: PiT's final norm and head."""
        vit = self.vit
        return vit.head(vit.head_drop(vit.norm(cls)))

    freeze_dropped = True  # training: a dropped row keeps its value (the frozen-value rule)

    def forward_train(self, images, gumbel_noise=None):
        """The training forward (design section 8) stage by stage: each stage starts with its whole grid alive,
        its selector (if any) decides with the Gumbel straight-through estimator, later blocks of the stage
        attend with the policy and leave dropped rows at their values (x + keep * update). gumbel_noise: None
        or one tensor per selector broadcastable to (B, H_s * W_s, 2). Returns a TrainOutput whose tokens,
        decision and last decision are of the last stage's grid (decision all ones if it has no selector)."""
        grid, rows = self.forward_stem(images)
        B = grid.shape[0]
        noise = check_gumbel_noise(gumbel_noise, [(B, h * w, 2) for h, w in self.grid_sizes()])
        decisions = []
        for t_index, t in enumerate(self.vit.transformers):
            grid, rows = self.pool_stage_input(t_index, grid, rows)
            _, C, Hs, Ws = grid.shape
            P = Hs * Ws
            x = t.norm(torch.cat([rows[:, :1], grid.flatten(2).transpose(1, 2), rows[:, 1:]], dim=1))
            keep = x.new_ones(B, P, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            policy = None
            for j, block in enumerate(t.blocks):
                s = self.selector_at.get((t_index, j))
                if s is not None:
                    x, keep = self._train_stage(s, x, keep, P, noise[s])
                    decisions.append(keep)
                    policy = stage_policy(1, keep, x.shape[1] - 1 - P)
                x = self._train_blocks([block], x, policy)
            grid = x[:, 1: 1 + P].transpose(1, 2).reshape(B, C, Hs, Ws)
            rows = torch.cat([x[:, :1], x[:, 1 + P:]], dim=1)
        logits = self.forward_head_from_cls(rows[:, 0])
        return TrainOutput(logits, self.vit.norm(x[:, 1: 1 + P]), keep.detach(), decisions)

    def _run(self, images, score_stage=None):
        if self.training:
            raise RuntimeError("stage_scores runs the inference form: call model.eval() first")
        grid, rows = self.forward_stem(images)  # rows: [cls] then, after the first selector, [cls, package]
        masks = []
        for t_index, t in enumerate(self.vit.transformers):
            grid, rows = self.pool_stage_input(t_index, grid, rows)
            B, C, Hs, Ws = grid.shape
            P = Hs * Ws
            x = t.norm(torch.cat([rows[:, :1], grid.flatten(2).transpose(1, 2), rows[:, 1:]], dim=1))
            alive = torch.ones(B, P, dtype=torch.bool, device=x.device)
            carried = None  # (B, N, 1) the rows blocks still update; None = all
            for j, block in enumerate(t.blocks):
                s = self.selector_at.get((t_index, j))
                if s is not None:
                    if s == score_stage:
                        return self._score_stage(s, x, alive, P)[0][:, :P], alive
                    x, alive, keys = self._prune_stage(s, x, alive, P)
                    masks.append(alive)
                    bias, carried = attention_bias(keys, x.dtype), keys[..., None]
                if carried is None:
                    x = block(x)
                else:  # frozen-value rule: a dropped row keeps the value it had when it was dropped
                    x = torch.where(carried, masked_block_forward(block, x, bias), x)
            grid = x[:, 1: 1 + P].transpose(1, 2).reshape(B, C, Hs, Ws)
            rows = torch.cat([x[:, :1], x[:, 1 + P:]], dim=1)
        return self.forward_head_from_cls(rows[:, 0]), masks

    def _info(self, masks):
        info = super()._info(masks)
        info["grid_sizes"] = self.grid_sizes()
        return info

    def grid_sizes(self):
        """(H_s, W_s) of the grid each selector prunes, from the backbone's stem grid (stride-2 pooling)."""
        H, W = self.vit.patch_embed.grid_size
        sizes = {}
        for stage, t in enumerate(self.vit.transformers):
            if t.pool is not None:
                conv = t.pool.conv
                k, st, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
                H, W = (H + 2 * p - k) // st + 1, (W + 2 * p - k) // st + 1
            sizes[stage] = (H, W)
        return [sizes[stage] for (stage, _), _ in sorted(self.selector_at.items(), key=lambda kv: kv[1])]


def from_timm_pit(vit, **cfg):
    """Wrap a timm PoolingVisionTransformer (kept as is, not copied) into an SPViTPiT with fresh selectors (one
    per configured stage, of that stage's width and heads) on its device and dtype, in eval mode.

    Args:
        vit: timm `pit_ti_224` / `pit_xs_224` / `pit_s_224` or any non-distilled PoolingVisionTransformer whose
            stages have >= 2 heads of a head dim that is a multiple of 4.
        **cfg: pruning, keep_ratios (one per selector, each relative to its stage's grid; default (0.617, 0.369,
            0.137): PiT-S at 224 keeps 450 of 729, 72 of 196, 7 of 49),
            selector_layers (global block indices, one per stage at most, not a stage's first block for
            stages after the first; default (1, 5, 10)), package ("mean" | "sum"), package_merge ("add"
            only), threshold.
    """
    check_pit(vit)
    prune_cfg, _ = split_config_kwargs(cfg)
    config = make_pit_config(vit, **prune_cfg)
    bounds = stage_bounds(vit)
    ref = next(vit.parameters())
    selectors = []
    for layer in config.selector_layers:
        attn = vit.transformers[stage_of_layer(bounds, layer)].blocks[0].attn
        selectors.append(TokenSelector(attn.num_heads * attn.head_dim, attn.num_heads, device=ref.device,
                                       dtype=ref.dtype))
    return SPViTPiT(vit, selectors, config).eval()


def create_spvit_pit(timm_name, num_classes=1000, img_size=224, patch_size=None, drop_path_rate=0.0, **prune_cfg):
    """An SPViT-PiT on a fresh timm `timm_name` (pit_ti_224 / pit_xs_224 / pit_s_224), random init, eval."""
    import timm

    if patch_size is not None:
        raise ValueError(f"patch_size: PiT's stem (patch 16, stride 8 in timm's pit_*_224) is fixed by {timm_name}; leave it unset")
    vit = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, img_size=img_size,
                            drop_path_rate=drop_path_rate)
    return from_timm_pit(vit, **prune_cfg)


__all__ = ["PIT_MODELS", "SPViTPiT", "create_spvit_pit", "from_timm_pit", "make_pit_config"]
