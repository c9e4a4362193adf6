"""LV-ViT-S / LV-ViT-M (token labeling ViTs) as SPViT backbones (design section 5, "Model families").

timm does not ship LV-ViT, so the backbone is written here. Its parameter names are those of the
published LV-ViT checkpoints, so their backbone weights load with `load_state_dict`:
    patch_embed.conv1 / bn1 / conv2 / bn2 / conv3 / bn3 / proj    the 4-layer convolutional stem
    cls_token, pos_embed
    blocks.<i>.norm1 / attn.qkv (no bias) / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    norm, head, aux_head
The blocks are timm `Block`s whose two residual branches are divided by skip_lam (= 2): timm's
layer-scale slots ls1 / ls2 hold the division, so the masked and packed block forms of the DeiT family
run them unchanged. LayerNorms use eps 1e-5 (torch's default), as the published model.

Classification: logits = head(cls) + 0.5 * max over patch rows of aux_head(patch row), after the final
norm. Under pruning the max runs over the patches still alive after the last stage (package rows are not
patches; dropped patches do not count); with no patch left the aux term is 0.
"""

import torch
from torch import nn

from .config import make_config
from .spvit import SPViT

# name suffix -> (embed_dim, depth, num_heads, default selector_layers)
LVVIT_SHAPES = {
    "s": (384, 16, 6, (4, 8, 12)),
    "m": (512, 20, 8, (5, 10, 15)),
}
STEM_CHANNELS = 64
AUX_WEIGHT = 0.5


class ConvStem(nn.Module):
    """images (B, in_chans, H, W) -> (B, P, C) patch tokens: conv 7x7/2 (no bias) BN ReLU, twice conv 3x3
    (no bias) BN ReLU, then a (patch_size/2)x(patch_size/2) stride-(patch_size/2) projection to C."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384):
        super().__init__()
        if img_size % patch_size != 0 or patch_size % 2 != 0:
            raise ValueError(f"img_size {img_size} must be a multiple of the (even) patch_size {patch_size}")
        c = STEM_CHANNELS
        self.conv1 = nn.Conv2d(in_chans, c, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)
        self.img_size = (img_size, img_size)  # fixed: the position embedding has one grid
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, images):
        x = torch.relu(self.bn1(self.conv1(images)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class DivideBy(nn.Module):
    """x / skip_lam: LV-ViT's residual-branch scaling, in the slot of timm's layer scale."""

    def __init__(self, skip_lam):
        super().__init__()
        self.skip_lam = float(skip_lam)

    def forward(self, x):
        return x / self.skip_lam

    def extra_repr(self):
        return f"skip_lam={self.skip_lam}"


class LVViT(nn.Module):
    """The LV-ViT backbone (inference). `forward(images)` -> logits (B, num_classes), as the published model
    in eval mode.

    Args:
        img_size: input side in pixels (a multiple of patch_size); P = (img_size / patch_size)^2 patches.
        patch_size: 16 (stride of the stem: 2 in conv1, patch_size / 2 in proj).
        embed_dim, depth, num_heads: C, blocks, attention heads.
        mlp_ratio: MLP hidden width / C (3 for LV-ViT).
        skip_lam: each residual branch is divided by it (2 for LV-ViT-S/M).
        num_classes: outputs of head and aux_head.
        drop_path_rate: stochastic depth of the last block in training (linear from 0 over the blocks).
    """

    num_prefix_tokens = 1  # the class token
    global_pool = "token"

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=16,
                 num_heads=6, mlp_ratio=3.0, skip_lam=2.0, drop_path_rate=0.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList()
        for i in range(depth):
            dpr = drop_path_rate * i / max(depth - 1, 1)  # stochastic depth, linear over the blocks
            block = Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, norm_layer=nn.LayerNorm,
                          drop_path=dpr)
            block.ls1, block.ls2 = DivideBy(skip_lam), DivideBy(skip_lam)
            self.blocks.append(block)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.aux_head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, images):
        """images (B, in_chans, H, W) -> (B, 1 + P, C): stem, class token, position embedding."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed.to(x.dtype)

    def forward_head(self, x):
        """x (B, 1 + n, C): the final-normed class row and n patch rows -> head(cls) + 0.5 * max of aux_head
        over the n patches (0 when n = 0)."""
        logits = self.head(x[:, 0])
        if x.shape[1] == 1:
            return logits
        return logits + AUX_WEIGHT * self.aux_head(x[:, 1:]).amax(dim=1)

    def forward(self, images):
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.forward_head(self.norm(x))


class SPViTLVViT(SPViT):
    """SPViT on an LV-ViT backbone (model.vit, state_dict keys "vit.*"). Same interface and masked semantics
    as SPViT; the head adds the aux-head max over the patches alive after the last stage. In training a dropped
    row's block update is multiplied by its keep mask (it keeps its value, as at inference)."""

    freeze_dropped = True

    def __init__(self, vit, selectors, config):
        super().__init__(vit, selectors, config)
        self.head_kind = "lvvit"

    def forward_stem(self, images):
        return self.vit.embed(images)

    def forward_head(self, prefix, pooled):
        raise NotImplementedError("LV-ViT's head reads the patch rows: see _head_masked / _head_packed")

    def forward_head_from_cls(self, cls):
        raise NotImplementedError("LV-ViT's head reads the patch rows: see _head_masked / _head_packed")

    def _lvvit_logits(self, cls, aux_max, has_patch):
        """cls (B, C) normed class rows, aux_max (B, K) the max of aux_head over the alive patches, has_patch
        (B,) bool whether any patch is alive -> logits (B, K)."""
        vit = self.vit
        return vit.head(cls) + AUX_WEIGHT * torch.where(has_patch[:, None], aux_max, 0)

    def _head_masked(self, x, alive):
        """x (B, 1 + P + packages, C) final rows, alive (B, P) the patches alive after the last stage."""
        vit = self.vit
        P = alive.shape[1]
        aux = vit.aux_head(vit.norm(x[:, 1: 1 + P]))  # (B, P, K)
        aux_max = torch.where(alive[..., None], aux, float("-inf")).amax(dim=1)
        return self._lvvit_logits(vit.norm(x[:, 0]), aux_max, alive.any(dim=1))

    def _head_packed(self, x, cu, num_packages):
        """x (T, C) final packed rows [cls, alive patches, package rows] per image (cu (B+1,) int32): the aux
        max is one segment max (scatter_reduce amax by image id) over the patch rows; no loop, no sync."""
        vit = self.vit
        B = cu.shape[0] - 1
        image, pos, lengths = self._row_layout(x, cu)
        is_patch = (pos >= 1) & (pos < lengths[image] - num_packages)
        aux = vit.aux_head(vit.norm(x))  # (T, K): every row (no data-dependent gather)
        aux = torch.where(is_patch[:, None], aux, float("-inf"))
        init = torch.full((B, aux.shape[1]), float("-inf"), dtype=aux.dtype, device=aux.device)
        aux_max = init.scatter_reduce(0, image[:, None].expand_as(aux), aux, reduce="amax")
        has_patch = lengths - 1 - num_packages > 0
        return self._lvvit_logits(vit.norm(x[cu[:-1].long()]), aux_max, has_patch)


def from_lvvit(vit, **cfg):
    """Wrap an LVViT backbone (kept as is) into an SPViTLVViT with fresh selectors, in eval mode.

    Args:
        vit: an LVViT.
        **cfg: pruning, keep_ratios, selector_layers (required: no default fits every depth), package,
            package_merge, threshold (see create_model).
    """
    if not isinstance(vit, LVViT):
        raise TypeError(f"vit must be an LVViT, got {type(vit).__name__}")
    return SPViTLVViT.around(vit, vit.blocks[0].attn.num_heads, **cfg)


def create_spvit_lvvit(size, num_classes=1000, img_size=224, patch_size=16, drop_path_rate=0.0, **prune_cfg):
    """spvit_lvvit_s (size "s": C 384, depth 16, 6 heads, selectors before 4, 8, 12) or spvit_lvvit_m
    ("m": C 512, depth 20, 8 heads, selectors before 5, 10, 15), randomly initialised, eval mode."""
    embed_dim, depth, num_heads, layers = LVVIT_SHAPES[size]
    prune_cfg.setdefault("selector_layers", layers)
    make_config(depth, **prune_cfg)  # fail on a bad config before building the backbone
    vit = LVViT(img_size=img_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, drop_path_rate=drop_path_rate)
    return from_lvvit(vit, **prune_cfg)
