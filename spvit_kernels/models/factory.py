"""Building SPViT models: `create_model(name, **cfg)` from scratch, `from_timm(vit, **cfg)` around a timm ViT."""

from functools import partial

from .config import make_config, split_config_kwargs
from .lvvit import create_spvit_lvvit
from .masked_block import check_block
from .pit import PIT_MODELS, create_spvit_pit, from_timm_pit
from .spvit import SPViT

# DeiT shapes (depth 12, patch 16, 224 px, mlp_ratio 4, qkv_bias): name -> (embed_dim, num_heads).
# 256 and 320 are the paper's "SPViT-256/320" DeiT variants (64 channels per head).
MODEL_SHAPES = {
    "spvit_deit_tiny": (192, 3),
    "spvit_deit_small": (384, 6),
    "spvit_deit_base": (768, 12),
    "spvit_deit_256": (256, 4),
    "spvit_deit_320": (320, 5),
}
# timm's deit_*_distilled_patch16_224 shapes: a class and a distillation token, two heads.
DISTILLED_SHAPES = {
    "spvit_deit_tiny_distilled": (192, 3),
    "spvit_deit_small_distilled": (384, 6),
    "spvit_deit_base_distilled": (768, 12),
}
TIMM_ARGS = ("num_classes", "img_size", "patch_size", "drop_path_rate")


def _deit(embed_dim, num_heads, distilled=False, num_classes=1000, img_size=224, patch_size=16, drop_path_rate=0.0,
          **prune_cfg):
    """An SPViT-DeiT of the given width on a fresh timm ViT (VisionTransformerDistilled if `distilled`)."""
    if distilled:
        from timm.models.deit import VisionTransformerDistilled as ViT
    else:
        from timm.models.vision_transformer import VisionTransformer as ViT
    make_config(12, **prune_cfg)  # fail on a bad config before building the ViT
    vit = ViT(img_size=img_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim, depth=12,
              num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=drop_path_rate)
    return from_timm(vit, **prune_cfg)


# The model registry: name -> builder(num_classes=..., img_size=..., **pruning config) -> SPViT model.
MODELS = {
    **{name: partial(_deit, *shape) for name, shape in MODEL_SHAPES.items()},
    **{name: partial(_deit, *shape, distilled=True) for name, shape in DISTILLED_SHAPES.items()},
    "spvit_lvvit_s": partial(create_spvit_lvvit, "s"),
    "spvit_lvvit_m": partial(create_spvit_lvvit, "m"),
    **{name: partial(create_spvit_pit, timm_name) for name, timm_name in PIT_MODELS.items()},
}


def list_models():
    """The names `create_model` accepts."""
    return sorted(MODELS)


def create_model(name, *, checkpoint=None, **cfg):
    """An SPViT model in eval mode, randomly initialised or loaded from `checkpoint` (nothing is downloaded).

    Args:
        name: one of list_models():
            spvit_deit_tiny (192 channels, 3 heads), spvit_deit_small (384, 6), spvit_deit_base (768, 12),
            spvit_deit_256 (256, 4), spvit_deit_320 (320, 5): DeiT, depth 12, patch 16, mlp_ratio 4, qkv_bias;
            spvit_deit_{tiny,small,base}_distilled: the same with timm's distillation token and head
            (logits = mean of the two heads);
            spvit_lvvit_s (384 channels, depth 16, 6 heads, selectors before blocks 4, 8, 12),
            spvit_lvvit_m (512, depth 20, 8 heads, selectors before 5, 10, 15): LV-ViT (models/lvvit.py);
            spvit_pit_ti / spvit_pit_xs / spvit_pit_s: timm's pit_*_224, one selector per stage before
            global blocks 1, 5, 10, package_merge "add" only, keep ratios per stage (models/pit.py).
        checkpoint: None, or a path / state dict for `load_checkpoint(model, checkpoint)` (strict).
        **cfg: pruning ("topk" | "threshold", default "topk"), keep_ratios (default (0.617, 0.369, 0.137)),
            selector_layers (default (3, 6, 9) for DeiT), package ("mean" | "sum" | "none", default
            "mean"), package_merge ("concat" | "add", default "concat"), threshold (default 0.0);
            gumbel_tau (default 1.0) and train_attn_eps (default 1e-6) for training mode;
            num_classes (default 1000), img_size (default 224), patch_size (default 16; DeiT and LV-ViT,
            PiT's stem is fixed) and drop_path_rate (default 0, stochastic depth in training, linear over
            depth) go to the backbone.
    Returns:
        an SPViT module (see spvit_kernels.models.SPViT).
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {list_models()}, got {name!r}")
    prune_cfg, backbone_cfg = split_config_kwargs(cfg, TIMM_ARGS)
    model = MODELS[name](**backbone_cfg, **prune_cfg)
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model


def _check_vit(vit):
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"vit must be a timm VisionTransformer, got {type(vit).__name__}")
    if vit.global_pool not in ("token", "avg"):
        raise ValueError(f"vit.global_pool is {vit.global_pool!r}; SPViT supports 'token' and 'avg'")
    if vit.global_pool == "token" and getattr(vit, "cls_token", None) is None:
        raise ValueError("vit has no class token but global_pool='token' reads one")
    if getattr(vit, "attn_pool", None) is not None or getattr(vit, "pool_include_prefix", False):
        raise ValueError("vit: attention pooling / pooling over prefix tokens is not supported")
    prefix = (getattr(vit, "cls_token", None) is not None) + (getattr(vit, "dist_token", None) is not None) + \
        int(getattr(vit, "num_reg_tokens", 0))
    if vit.num_prefix_tokens != prefix:
        raise ValueError(f"vit has num_prefix_tokens = {vit.num_prefix_tokens}, but {prefix} class / distillation / "
                         "register tokens")
    if len(vit.blocks) == 0:
        raise ValueError("vit has no blocks")
    for i, block in enumerate(vit.blocks):
        check_block(block, i)
    heads = {block.attn.num_heads for block in vit.blocks}
    if len(heads) != 1:
        raise ValueError(f"vit: the blocks' attention heads differ ({sorted(heads)}); the selectors need one H")
    (H,) = heads
    C = vit.embed_dim
    if H < 2 or C % H != 0 or (C // H) % 4 != 0:
        raise ValueError(f"vit heads don't fit the selector: embed_dim {C} with {H} heads (needs >= 2 heads and "
                         f"a head dim C / H that is a whole multiple of 4)")
    return H


def from_timm(vit, **cfg):
    """Wrap an existing timm VisionTransformer (kept as is, not copied: its weights are unchanged) into an
    SPViT with freshly initialised selectors on the ViT's device and dtype. Returns the model in eval
    mode (which also puts `vit` in eval mode).

    Args:
        vit: a timm VisionTransformer (or VisionTransformerDistilled) with global_pool='token' (class token;
            with a distillation token the two heads are averaged) or global_pool='avg' (mean over the
            non-prefix rows; with or without class token), any number of register tokens, plain timm
            Blocks, and heads that fit the selector (H >= 2, C / H a multiple of 4). Its prefix rows
            (class, distillation, register tokens) are never pruned.
        **cfg: pruning, keep_ratios, selector_layers, package, package_merge, threshold (see create_model).
    A timm PoolingVisionTransformer (PiT) goes to `models.pit.from_timm_pit`, which documents its rules.
    Raises:
        TypeError / ValueError naming the problem.
    """
    from timm.models.pit import PoolingVisionTransformer

    if isinstance(vit, PoolingVisionTransformer):  # PiT: its stages and pooling layers, see models/pit.py
        return from_timm_pit(vit, **cfg)
    return SPViT.around(vit, _check_vit(vit), **cfg)
