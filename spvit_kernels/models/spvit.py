"""The reference SPViT model: a timm VisionTransformer plus token selectors, run in the official masked form.

Structure (what `spvit_kernels.accelerate` re-runs on packed ragged rows):
    model.vit          the timm VisionTransformer, unchanged (state_dict keys "vit.*")
    model.selectors    nn.ModuleList of TokenSelector, selectors[s] sits before vit.blocks[config.selector_layers[s]]
                       (state_dict keys "selectors.<s>.*")
    model.config       SPViTConfig: pruning, keep_ratios, selector_layers, package, threshold (per stage:
                       config.threshold_at(s))
    model.forward_stem(images) -> (B, 1 + P, C)     patch embed + cls + pos embed + norm_pre
    model.vit.blocks[i]                             plain timm blocks
    model.forward_head_from_cls(cls) -> logits      final norm + head on the final cls rows (B, C)
    model.num_keep(stage, P), model.config.num_packages_after(stage)

Masked forward (SPEC section 2, "Blocks"): the (B, 1 + P, C) token tensor is kept whole. Rows are
[cls, P spatial tokens in patch order (dropped ones stay in place), package tokens appended in stage order].
At stage s, before block selector_layers[s]:
  1. the selector scores every non-cls row, its global mean over the image's alive rows
     (alive spatial + earlier package tokens; dropped rows excluded);
  2. the keep decision picks among the alive spatial tokens only (cls and package tokens always stay);
  3. the tokens dropped at this stage are pooled into a new package token ("none": no token), appended;
  4. every later block masks attention keys to cls + alive spatial + package tokens (each row also sees
     itself, so the dropped rows, which nothing reads any more, stay finite).
Blocks before the first selector are the plain timm blocks. The cls output equals the one of the pruned
ragged execution (tested against an independent token-dropping formulation).

Inference only: the model is created in eval mode and refuses to run in training mode; the training-time
Gumbel / soft masks of the paper are not provided.
"""

import torch
from torch import nn

from .decision import keep_decision, pool_package
from .masked_block import attention_bias, masked_block_forward


class SPViT(nn.Module):
    """SPViT on a timm VisionTransformer (class token, token pooling). Build with `create_model` / `from_timm`.

    `model(images)` -> logits (B, num_classes).
    `model(images, return_info=True)` -> (logits, info), info a dict with, for S stages and B images:
        "kept_indices": list (S) of lists (B) of int64 CPU tensors: the patches (original numbering 0..P-1,
                        sorted ascending) image b still has after stage s.
        "num_kept":     int64 CPU tensor (S, B): len(kept_indices[s][b]).
        "num_tokens":   int64 CPU tensor (S, B): tokens image b carries after stage s in the pruned form,
                        1 (cls) + num_kept + config.num_packages_after(s).
        "selector_layers": config.selector_layers (the block each stage sits before).
    """

    def __init__(self, vit, selectors, config):
        super().__init__()
        self.vit = vit
        self.selectors = nn.ModuleList(selectors)
        self.config = config
        self.num_heads = vit.blocks[0].attn.num_heads
        self.embed_dim = vit.embed_dim

    def extra_repr(self):
        c = self.config
        return (f"pruning={c.pruning!r}, keep_ratios={c.keep_ratios}, selector_layers={c.selector_layers}, "
                f"package={c.package!r}, threshold={c.threshold}")

    def num_keep(self, stage, num_patches):
        """Patches kept by top-k pruning after `stage`: round(keep_ratios[stage] * num_patches)."""
        return self.config.num_keep(stage, num_patches)

    def check_images(self, images):
        """Raise a TypeError / ValueError naming `images` unless it is (B, in_chans, H, W) as the model expects
        (H, W: the patch embedding's image size where it is fixed)."""
        pe = self.vit.patch_embed
        in_chans = pe.proj.in_channels
        fixed = getattr(pe, "strict_img_size", False) and pe.img_size is not None
        want = f"(B, {in_chans}, {pe.img_size[0]}, {pe.img_size[1]})" if fixed else f"(B, {in_chans}, H, W)"
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a tensor of shape {want}, got {type(images).__name__}")
        if (images.dim() != 4 or images.shape[1] != in_chans
                or (fixed and tuple(images.shape[2:]) != tuple(pe.img_size))):
            raise ValueError(f"images must have shape {want}, got {tuple(images.shape)}")

    def forward_stem(self, images):
        """images (B, in_chans, H, W) -> tokens (B, 1 + P, C): patch embed, cls, pos embed, norm_pre."""
        self.check_images(images)
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_head_from_cls(self, cls):
        """Final cls rows (B, C), straight out of the last block -> logits (B, num_classes).

        Applies the final LayerNorm row-wise (the same as normalising the whole sequence, then taking cls)."""
        vit = self.vit
        return vit.head(vit.head_drop(vit.fc_norm(vit.norm(cls))))

    def forward(self, images, return_info=False):
        """images (B, in_chans, H, W) -> logits (B, num_classes), or (logits, info) with return_info=True."""
        logits, masks = self._run(images)
        if not return_info:
            return logits
        return logits, self._info(masks)

    def stage_scores(self, images, stage):
        """The keep scores stage `stage` (0-based) decides on, with the earlier stages pruning as configured.

        Returns (keep_score (B, P) float32 (float64 for a float64 model), candidates (B, P) bool): the score
        of every spatial token and which of them are still alive (only those can be kept). Used by
        `calibrate_thresholds`; the scores of non-candidates are meaningless."""
        if not 0 <= stage < self.config.num_stages:
            raise ValueError(f"stage must lie in [0, {self.config.num_stages}), got {stage}")
        return self._run(images, score_stage=stage)

    def _run(self, images, score_stage=None):
        """The masked forward -> (logits, alive masks after every stage); or, with score_stage, stop at that
        stage and return (keep_score of its spatial tokens, candidates)."""
        if self.training:
            raise RuntimeError("SPViT reference models are inference-only (training with Gumbel / soft masks is "
                               "not provided): call model.eval() first")
        cfg = self.config
        x = self.forward_stem(images)
        B, N0, _ = x.shape
        P = N0 - 1
        alive = torch.ones(B, P, dtype=torch.bool, device=x.device)  # spatial tokens not dropped yet
        stage_at = {layer: s for s, layer in enumerate(cfg.selector_layers)}
        masks, bias = [], None
        for i, block in enumerate(self.vit.blocks):
            if i in stage_at:
                if stage_at[i] == score_stage:
                    return self._score_stage(score_stage, x, alive, P)[0][:, :P], alive
                x, alive, keys = self._prune_stage(stage_at[i], x, alive, P)
                masks.append(alive)
                bias = attention_bias(keys, x.dtype)
            x = block(x) if bias is None else masked_block_forward(block, x, bias)
        return self.forward_head_from_cls(x[:, 0]), masks

    def _score_stage(self, stage, x, alive, P):
        """Selector `stage` on x (B, 1 + P + packages, C); the global mean over alive spatial + package rows."""
        n_pkg = x.shape[1] - 1 - P
        rows = torch.cat([alive, torch.ones(x.shape[0], n_pkg, dtype=torch.bool, device=x.device)], dim=1)
        return self.selectors[stage].score_masked(x[:, 1:], rows)

    def _prune_stage(self, stage, x, alive, P):
        """Score, decide and package at one stage. x (B, 1 + P + packages, C), alive (B, P) bool.

        Returns (x with the new package row appended, the new alive mask, the attention key mask (B, N))."""
        cfg = self.config
        B = x.shape[0]
        n_pkg = x.shape[1] - 1 - P
        ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=x.device)  # noqa: E731
        keep_score, keep_prob = self._score_stage(stage, x, alive, P)
        keep = keep_decision(keep_score[:, :P], alive, cfg.pruning, cfg.threshold_at(stage), self.num_keep(stage, P))
        if cfg.package != "none":
            package = pool_package(x[:, 1: P + 1], keep_prob[:, :P], alive & ~keep, cfg.package)
            x = torch.cat([x, package[:, None]], dim=1)
            n_pkg += 1
        keys = torch.cat([ones(1), keep, ones(n_pkg)], dim=1)
        return x, keep, keys

    def _info(self, masks):
        kept = [[torch.nonzero(m).flatten().cpu() for m in mask] for mask in masks]
        return self._info_dict(kept)

    def _info_dict(self, kept):
        """The return_info dict from kept (list (S) of lists (B) of int64 CPU tensors of patch indices)."""
        num_kept = torch.tensor([[len(t) for t in stage] for stage in kept], dtype=torch.int64)
        packages = torch.tensor([self.config.num_packages_after(s) for s in range(len(kept))], dtype=torch.int64)
        return {"kept_indices": kept, "num_kept": num_kept, "num_tokens": 1 + num_kept + packages[:, None],
                "selector_layers": self.config.selector_layers}
