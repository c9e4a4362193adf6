"""The reference SPViT model: a timm VisionTransformer plus token selectors, run in the official masked form.

Structure (what `spvit_kernels.accelerate` re-runs on packed ragged rows):
    model.vit          the timm VisionTransformer, unchanged (state_dict keys "vit.*")
    model.selectors    nn.ModuleList of TokenSelector, selectors[s] sits before vit.blocks[config.selector_layers[s]]
                       (state_dict keys "selectors.<s>.*")
    model.config       SPViTConfig: pruning, keep_ratios, selector_layers, package, threshold (per stage:
                       config.threshold_at(s)), package_merge
    model.num_prefix   prefix rows of every image (cls, distillation, register tokens; 0 for a class-free ViT)
    model.forward_stem(images) -> (B, num_prefix + P, C)   patch embed + prefix tokens + pos embed + norm_pre
    model.vit.blocks[i]                                    plain timm blocks
    model.forward_head(prefix, pooled) -> logits           the head on the final (normed) prefix rows or on the
                                                           mean of the other rows (global_pool="avg")
    model.num_keep(stage, P), model.config.num_packages_after(stage)

Masked forward (design section 2, "Blocks"): the (B, num_prefix + P, C) token tensor is kept whole. Rows are
[prefix rows, P spatial tokens in patch order (dropped ones stay in place), package rows]. At stage s,
before block selector_layers[s]:
  1. the selector scores every non-prefix row, its global mean over the image's alive rows
     (alive spatial + package rows; dropped rows excluded);
  2. the keep decision picks among the alive spatial tokens only (prefix and package rows always stay);
  3. the tokens dropped at this stage are pooled into a package token ("none": no token); "concat" appends
     it, "add" appends it at the first stage and adds it to the one package row afterwards;
  4. every later block masks attention keys to prefix + alive spatial + package rows (each row also sees
     itself, so the dropped rows, which nothing reads any more, stay finite).
Blocks before the first selector are the plain timm blocks. The head reads the final prefix rows (class
token; class and distillation tokens, whose two heads are averaged) or, for global_pool="avg", the mean
over the rows the image still carries (alive patches and package rows). The logits equal the ones of the
pruned ragged execution (tested against an independent token-dropping formulation).

Training (design section 8): in training mode `model(images, gumbel_noise=None)` runs the paper code's training
form (Gumbel straight-through decisions, weighted selector means, policy attention; see train_forward.py) and
returns a TrainOutput. The DeiT family lets dropped rows keep going through the blocks, as the official code;
families whose later layers read token positions (LV-ViT, PiT) set `freeze_dropped` and multiply a dropped
row's block update by its keep mask, so that it keeps its value, as at inference.
"""

import torch
from torch import nn

from .config import make_config, split_config_kwargs
from .decision import keep_decision, pool_package
from .masked_block import attention_bias, masked_block_forward
from .selector import TokenSelector
from .train_forward import (TrainOutput, check_gumbel_noise, frozen_update, gumbel_keep, policy_blocks_forward,
                            pool_package_train, stage_policy)


def head_kind(vit):
    """How `vit` classifies: "token" (head on the class row), "distilled" (mean of head(cls) and
    head_dist(dist)) or "avg" (head on the mean of the non-prefix rows)."""
    if getattr(vit, "dist_token", None) is not None:
        return "distilled"
    return "avg" if vit.global_pool == "avg" else "token"


class SPViT(nn.Module):
    """SPViT on a timm VisionTransformer. Build with `create_model` / `from_timm`.

    `model(images)` -> logits (B, num_classes).
    `model(images, return_info=True)` -> (logits, info), info a dict with, for S stages and B images:
        "kept_indices": list (S) of lists (B) of int64 CPU tensors: the patches (original numbering 0..P-1,
                        sorted ascending) image b still has after stage s.
        "num_kept":     int64 CPU tensor (S, B): len(kept_indices[s][b]).
        "num_tokens":   int64 CPU tensor (S, B): tokens image b carries after stage s in the pruned form,
                        num_prefix + num_kept + config.num_packages_after(s).
        "selector_layers": config.selector_layers (the block each stage sits before).
    In training mode (`model.train()`), `model(images, gumbel_noise=None)` -> TrainOutput (design section 8).
    """

    # Whether a dropped row's block update is multiplied by its keep mask in training (LV-ViT, PiT).
    freeze_dropped = False

    def __init__(self, vit, selectors, config):
        super().__init__()
        self.vit = vit
        self.selectors = nn.ModuleList(selectors)
        self.config = config
        self.num_heads = vit.blocks[0].attn.num_heads
        self.embed_dim = vit.embed_dim
        self.num_prefix = int(vit.num_prefix_tokens)
        self.head_kind = head_kind(vit)

    @classmethod
    def around(cls, vit, num_heads, **cfg):
        """A model of this class around `vit` (kept as is) with fresh selectors of `num_heads` heads on the
        backbone's device and dtype, the config `cfg` validated for its depth; in eval mode."""
        prune_cfg, _ = split_config_kwargs(cfg)
        config = make_config(len(vit.blocks), **prune_cfg)
        ref = next(vit.parameters())
        selectors = [TokenSelector(vit.embed_dim, num_heads, device=ref.device, dtype=ref.dtype)
                     for _ in config.selector_layers]
        return cls(vit, selectors, config).eval()

    def extra_repr(self):
        c = self.config
        return (f"pruning={c.pruning!r}, keep_ratios={c.keep_ratios}, selector_layers={c.selector_layers}, "
                f"package={c.package!r}, package_merge={c.package_merge!r}, threshold={c.threshold}, "
                f"num_prefix={self.num_prefix}, head={self.head_kind!r}")

    def validated_config(self, **fields):
        """`fields` (SPViTConfig's) validated for this model's backbone -> an SPViTConfig (ValueError /
        TypeError naming the field otherwise). Families with other rules (PiT) override it."""
        return make_config(len(self.vit.blocks), **fields)

    def num_keep(self, stage, num_patches):
        """Patches kept by top-k pruning after `stage`: round(keep_ratios[stage] * num_patches)."""
        return self.config.num_keep(stage, num_patches)

    def check_images(self, images):
        """Raise a TypeError / ValueError naming `images` unless it is (B, in_chans, H, W) as the model expects
        (H, W: the patch embedding's image size where it is fixed)."""
        pe = self.vit.patch_embed
        stem = next(m for m in pe.modules() if isinstance(m, nn.Conv2d))  # the stem's first conv
        in_chans = stem.in_channels
        # timm's ViT says whether its size is fixed (strict_img_size); stems without that flag (LV-ViT, PiT)
        # carry a position embedding of one grid, so their img_size is fixed.
        img_size = getattr(pe, "img_size", None)
        fixed = img_size is not None and getattr(pe, "strict_img_size", True)
        want = f"(B, {in_chans}, {img_size[0]}, {img_size[1]})" if fixed else f"(B, {in_chans}, H, W)"
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a tensor of shape {want}, got {type(images).__name__}")
        if (images.dim() != 4 or images.shape[1] != in_chans
                or (fixed and tuple(images.shape[2:]) != tuple(img_size))):
            raise ValueError(f"images must have shape {want}, got {tuple(images.shape)}")
        # The stem's convolution needs the weights' dtype; autocast casts float32 / 16-bit images itself.
        w_dtype = stem.weight.dtype
        autocast_ok = (torch.is_autocast_enabled(images.device.type)
                       and images.dtype in (torch.float32, torch.float16, torch.bfloat16))
        if images.dtype != w_dtype and not autocast_ok:
            raise TypeError(f"images must be a {str(w_dtype).replace('torch.', '')} tensor like the model's "
                            f"weights (float32 / float16 / bfloat16 under torch.autocast), got "
                            f"{str(images.dtype).replace('torch.', '')}: convert with images.to(...)")

    def forward_stem(self, images):
        """images (B, in_chans, H, W) -> tokens (B, num_prefix + P, C): patch embed, prefix tokens, pos
        embed, norm_pre. `images` has been through check_images (forward / stage_scores check it once)."""
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def final_norm(self, x):
        """The ViT's final norm, row by row (x (..., C))."""
        return self.vit.norm(x)

    def forward_head(self, prefix, pooled):
        """The classifier on the final rows, already through `final_norm`.

        Args:
            prefix: (B, num_prefix, C) the prefix rows (read by the "token" and "distilled" heads).
            pooled: (B, C) the mean of the rows each image still carries after its prefix rows (kept
                patches and package rows); only read by the "avg" head (None is fine otherwise).
        Returns:
            logits (B, num_classes).
        """
        vit = self.vit
        if self.head_kind == "distilled":  # timm's VisionTransformerDistilled in eval: mean of the two heads
            return (vit.head(vit.head_drop(prefix[:, 0])) + vit.head_dist(vit.head_drop(prefix[:, 1]))) / 2
        feature = pooled if self.head_kind == "avg" else prefix[:, 0]
        return vit.head(vit.head_drop(vit.fc_norm(feature)))

    def forward_head_from_cls(self, cls):
        """Final class rows (B, C), straight out of the last block -> logits of a "token" head."""
        return self.forward_head(self.final_norm(cls)[:, None], None)

    def forward(self, images, return_info=False, gumbel_noise=None):
        """images (B, in_chans, H, W) -> logits (B, num_classes), or (logits, info) with return_info=True.

        In training mode -> TrainOutput (see forward_train); gumbel_noise is only read there."""
        self.check_images(images)
        if self.training:
            if return_info:
                raise ValueError("return_info is an inference output; in training mode the forward returns a "
                                 "TrainOutput (its decisions give the keep masks)")
            return self.forward_train(images, gumbel_noise)
        if gumbel_noise is not None:
            raise ValueError("gumbel_noise is only used in training mode (call model.train() first)")
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
        self.check_images(images)
        return self._run(images, score_stage=stage)

    def _run(self, images, score_stage=None):
        """The masked forward -> (logits, alive masks after every stage); or, with score_stage, stop at that
        stage and return (keep_score of its spatial tokens, candidates)."""
        if self.training:
            raise RuntimeError("stage_scores runs the inference form: call model.eval() first")
        cfg = self.config
        x = self.forward_stem(images)
        B, N0, _ = x.shape
        P = N0 - self.num_prefix
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
        return self._head_masked(x, alive), masks

    def _head_masked(self, x, alive):
        """Logits from the final (B, num_prefix + P + packages, C) rows; `alive` (B, P) the surviving patches."""
        n = self.num_prefix
        if self.head_kind != "avg":
            return self.forward_head(self.final_norm(x[:, :n]), None)
        rows = self._carried(alive, x.shape[1] - n - alive.shape[1])[..., None]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # sum in fp32, as the packed form
        total = torch.where(rows, self.final_norm(x[:, n:]).to(acc), 0).sum(dim=1)
        pooled = (total / rows.sum(dim=1).clamp(min=1).to(acc)).to(x.dtype)
        return self.forward_head(self.final_norm(x[:, :n]), pooled)

    def _carried(self, alive, n_pkg):
        """(B, P + n_pkg) bool: the non-prefix rows an image still carries (alive patches, package rows)."""
        return torch.cat([alive, alive.new_ones(alive.shape[0], n_pkg)], dim=1)

    def _score_stage(self, stage, x, alive, P):
        """Selector `stage` on x (B, num_prefix + P + packages, C); the global mean over alive spatial + package
        rows."""
        n = self.num_prefix
        return self.selectors[stage].score_masked(x[:, n:], self._carried(alive, x.shape[1] - n - P))

    def _prune_stage(self, stage, x, alive, P):
        """Score, decide and package at one stage. x (B, num_prefix + P + packages, C), alive (B, P) bool.

        Returns (x with the new package row appended or merged, the new alive mask, the attention key mask
        (B, N))."""
        cfg = self.config
        n = self.num_prefix
        n_pkg = x.shape[1] - n - P
        keep_score, keep_prob = self._score_stage(stage, x, alive, P)
        keep = keep_decision(keep_score[:, :P], alive, cfg.pruning, cfg.threshold_at(stage), self.num_keep(stage, P))
        if cfg.package != "none":
            spatial, dropped = x[:, n: n + P], alive & ~keep
            if cfg.package_merge == "add" and n_pkg > 0:
                # 1x mode: the new pooled token is added to the one package row; summed in the accumulation
                # dtype and rounded once, like prune_pack.
                pooled = pool_package(spatial, keep_prob[:, :P], dropped, cfg.package, dtype=keep_prob.dtype)
                merged = (x[:, -1].to(pooled.dtype) + pooled).to(x.dtype)
                x = torch.cat([x[:, :-1], merged[:, None]], dim=1)
            else:
                package = pool_package(spatial, keep_prob[:, :P], dropped, cfg.package)
                x = torch.cat([x, package[:, None]], dim=1)
        keys = torch.cat([alive.new_ones(x.shape[0], n), self._carried(keep, x.shape[1] - n - P)], dim=1)
        return x, keep, keys

    def forward_train(self, images, gumbel_noise=None):
        """The training forward (design section 8), masked form, on checked images (B, in_chans, H, W).

        Args:
            gumbel_noise: None (drawn as F.gumbel_softmax draws it) or a list of one tensor per stage, each
                broadcastable to (B, P, 2) (zeros: no noise).
        Returns:
            TrainOutput(logits, tokens, decision, decisions).
        """
        cfg = self.config
        x = self.forward_stem(images)
        B, N0, _ = x.shape
        n = self.num_prefix
        P = N0 - n
        noise = check_gumbel_noise(gumbel_noise, [(B, P, 2)] * cfg.num_stages)
        stage_at = {layer: s for s, layer in enumerate(cfg.selector_layers)}
        keep = x.new_ones(B, P, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        policy, decisions = None, []
        blocks = list(self.vit.blocks)
        start = 0
        # the blocks between two selectors run as one segment: their residual adds fuse into the norms
        for layer in sorted(stage_at) + [len(blocks)]:
            x = self._train_blocks(blocks[start:layer], x, policy)
            if layer in stage_at:
                s = stage_at[layer]
                x, keep = self._train_stage(s, x, keep, P, noise[s])
                decisions.append(keep)
                policy = stage_policy(n, keep, x.shape[1] - n - P)
            start = layer
        logits = self._head_masked(x, keep.detach() > 0.5)
        return TrainOutput(logits, self.final_norm(x[:, n: n + P]), keep.detach(), decisions)

    def _train_blocks(self, blocks, x, policy):
        eps = self.config.train_attn_eps
        if not self.freeze_dropped:
            return policy_blocks_forward(blocks, x, policy, eps)
        for block in blocks:  # a dropped row keeps its value: every block's output is needed whole
            x = frozen_update(x, policy_blocks_forward([block], x, policy, eps), policy)
        return x

    def _train_stage(self, stage, x, m_prev, P, noise):
        """One stage of the training forward. x (B, num_prefix + P + packages, C); m_prev (B, P) the previous keep
        mask (with gradient). Returns (x with the new package row appended or merged, keep (B, P))."""
        cfg = self.config
        n = self.num_prefix
        n_pkg = x.shape[1] - n - P
        S = x[:, n:]
        rows = torch.cat([m_prev, m_prev.new_ones(m_prev.shape[0], n_pkg)], dim=1)
        score, prob = self.selectors[stage].train_scores(S, rows)
        keep = gumbel_keep(score[:, :P], noise, cfg.gumbel_tau) * m_prev
        if cfg.package != "none":
            pooled = pool_package_train(S[:, :P], prob[:, :P, 0], m_prev - keep, cfg.package)
            if cfg.package_merge == "add" and n_pkg > 0:
                x = torch.cat([x[:, :-1], (x[:, -1].to(pooled.dtype) + pooled).to(x.dtype)[:, None]], dim=1)
            else:
                x = torch.cat([x, pooled.to(x.dtype)[:, None]], dim=1)
        return x, keep

    def _info(self, masks):
        kept = [[torch.nonzero(m).flatten().cpu() for m in mask] for mask in masks]
        return self._info_dict(kept)

    def _info_dict(self, kept):
        """The return_info dict from kept (list (S) of lists (B) of int64 CPU tensors of patch indices)."""
        num_kept = torch.tensor([[len(t) for t in stage] for stage in kept], dtype=torch.int64)
        packages = torch.tensor([self.config.num_packages_after(s) for s in range(len(kept))], dtype=torch.int64)
        return {"kept_indices": kept, "num_kept": num_kept,
                "num_tokens": self.num_prefix + num_kept + packages[:, None],
                "selector_layers": self.config.selector_layers}
