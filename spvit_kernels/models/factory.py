"""Building SPViT models: `create_model(name, **cfg)` from scratch, `from_timm(vit, **cfg)` around a timm ViT."""

from .config import CONFIG_FIELDS, make_config
from .masked_block import check_block
from .selector import TokenSelector
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
TIMM_ARGS = ("num_classes", "img_size")


def list_models():
    """The names `create_model` accepts."""
    return sorted(MODEL_SHAPES)


def _split_cfg(cfg, allowed_extra=()):
    unknown = sorted(set(cfg) - set(CONFIG_FIELDS) - set(allowed_extra))
    if unknown:
        raise TypeError(f"{unknown[0]} is not a config field; expected some of {CONFIG_FIELDS + tuple(allowed_extra)}")
    return ({k: v for k, v in cfg.items() if k in CONFIG_FIELDS},
            {k: v for k, v in cfg.items() if k in allowed_extra})


def create_model(name, *, checkpoint=None, **cfg):
    """An SPViT-DeiT in eval mode, randomly initialised or loaded from `checkpoint` (nothing is downloaded).

    Args:
        name: one of list_models(): spvit_deit_tiny (192 channels, 3 heads), spvit_deit_small (384, 6),
            spvit_deit_base (768, 12), spvit_deit_256 (256, 4), spvit_deit_320 (320, 5); all depth 12,
            patch 16, 224 px, mlp_ratio 4, qkv_bias.
        checkpoint: None, or a path / state dict for `load_checkpoint(model, checkpoint)` (strict).
        **cfg: pruning ("topk" | "threshold", default "topk"), keep_ratios (default (0.617, 0.369, 0.137)),
            selector_layers (default (3, 6, 9)), package ("mean" | "sum" | "none", default "mean"),
            threshold (default 0.0); num_classes (default 1000) and img_size (default 224) go to timm.
    Returns:
        an SPViT module (see spvit_kernels.models.SPViT).
    """
    if name not in MODEL_SHAPES:
        raise ValueError(f"name must be one of {list_models()}, got {name!r}")
    from timm.models.vision_transformer import VisionTransformer

    prune_cfg, timm_cfg = _split_cfg(cfg, TIMM_ARGS)
    make_config(12, **prune_cfg)  # fail on a bad config before building the ViT
    embed_dim, num_heads = MODEL_SHAPES[name]
    vit = VisionTransformer(img_size=timm_cfg.get("img_size", 224), patch_size=16,
                            num_classes=timm_cfg.get("num_classes", 1000), embed_dim=embed_dim, depth=12,
                            num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True)
    model = from_timm(vit, **prune_cfg)
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model


def _check_vit(vit):
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"vit must be a timm VisionTransformer, got {type(vit).__name__}")
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("vit has no class token: SPViT classifies from the cls token")
    if getattr(vit, "num_reg_tokens", 0):
        raise ValueError(f"vit has {vit.num_reg_tokens} register tokens: not supported")
    if getattr(vit, "dist_token", None) is not None:
        raise ValueError("vit has a distillation token: not supported (use the non-distilled DeiT)")
    if vit.num_prefix_tokens != 1:
        raise ValueError(f"vit has {vit.num_prefix_tokens} prefix tokens; only the class token is supported")
    if vit.global_pool != "token":
        raise ValueError(f"vit.global_pool is {vit.global_pool!r}; SPViT needs global_pool='token'")
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
        vit: a timm VisionTransformer with a class token, global_pool='token', no register or distillation
            tokens, plain timm Blocks, and heads that fit the selector (H >= 2, C / H a multiple of 4).
        **cfg: pruning, keep_ratios, selector_layers, package, threshold (see create_model).
    Raises:
        TypeError / ValueError naming the problem.
    """
    H = _check_vit(vit)
    prune_cfg, _ = _split_cfg(cfg)
    config = make_config(len(vit.blocks), **prune_cfg)
    ref = vit.cls_token
    selectors = [TokenSelector(vit.embed_dim, H, device=ref.device, dtype=ref.dtype)
                 for _ in config.selector_layers]
    return SPViT(vit, selectors, config).eval()
