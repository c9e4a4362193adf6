"""`accelerate(model)`: switch a reference SPViT model to pruned ragged execution on the fused ops.

The reference model keeps the full (B, 1 + P, C) token tensor and masks attention, so pruning saves
nothing. The accelerated model runs the same modules with the same weights, but from the first selector
on the tokens live packed as (T, C) rows with `cu_seqlens` (image b owns rows cu_seqlens[b] ..
cu_seqlens[b+1]-1, laid out [prefix rows, kept patches in patch order, package rows]):

    blocks before the first selector   plain timm blocks on (B, 1 + P, C) (SDPA)
    selector s                         torch.ops.spvit.token_scores on the packed rows
                                       torch.ops.spvit.prune_pack: decision + gather + package token
    every later block                  LayerNorm / Linear / MLP on the packed rows (no padding),
                                       torch.ops.spvit.varlen_attention on strided views of qkv
    head                               the final prefix rows (gathered after cu_seqlens[:-1]) -> norm -> head,
                                       or for global_pool="avg" a segment mean over the other rows

Synchronisation: top-k pruning needs none (every image keeps the same number of patches, so all sizes are
known on the host): the forward can be captured in a CUDA graph and traced by torch.compile(fullgraph=True).
Threshold pruning copies one count to the host per stage (the number of kept rows sizes the output).

Training mode runs SPViT's masked training form on the same parameters (see models/train_forward.py); the
packed fast path is inference-only (the fused ops have no backward): see inference_only.py for what an eval
forward with autograd enabled does.
"""

import torch

from ..models import SPViT
from ..ops._validate import HEAD_DIMS
from .inference_only import InferenceOnly, would_record
from .packed_block import packed_block

__all__ = ["ACCELERATED", "AcceleratedLVViT", "AcceleratedPiT", "AcceleratedSPViT", "accelerate"]


class AcceleratedSPViT(SPViT):
    """An SPViT model whose forward runs on the pruned ragged batch. Same modules and state_dict as SPViT;
    `accelerate(model)` turns an SPViT into one in place. Same outputs, including `return_info`."""

    def forward(self, images, return_info=False, gumbel_noise=None):
        """images (B, in_chans, H, W) -> logits (B, num_classes), or (logits, info) with return_info=True
        (info as in SPViT.forward).

        In training mode it runs the training form of SPViT (masked, Gumbel decisions, policy attention; the
        same parameters) and returns a TrainOutput; `eval()` returns it to this pruned fast path. In eval mode
        with autograd enabled the forward runs without recording and the logits' backward raises a
        RuntimeError (the fused inference ops have no backward formulas)."""
        if self.training:
            return SPViT.forward(self, images, return_info, gumbel_noise)
        if gumbel_noise is not None:
            raise ValueError("gumbel_noise is only used in training mode (call model.train() first)")
        self.check_images(images)
        if images.shape[0] == 0:  # no rows to pack (cu_seqlens needs B >= 1): the masked form on 0 images
            with torch.no_grad():
                return SPViT.forward(self, images, return_info)
        anchor = would_record(self, images)
        if anchor is None:
            return self._forward_packed(images, return_info)
        with torch.no_grad():
            out = self._forward_packed(images, return_info)
        if return_info:
            return InferenceOnly.apply(out[0], anchor), out[1]
        return InferenceOnly.apply(out, anchor)

    def _forward_packed(self, images, return_info):
        cfg = self.config
        x = self.forward_stem(images)
        B, N0, C = x.shape
        P = N0 - self.num_prefix
        stage_at = {layer: s for s, layer in enumerate(cfg.selector_layers)}
        cu = patch_id = None
        stage_rows = []  # for return_info: (cu_seqlens, patch id of every row) after each stage
        for i, block in enumerate(self.vit.blocks):
            if i in stage_at:
                s = stage_at[i]
                if cu is None:  # first selector: pack the dense batch (all images have N0 rows)
                    x = x.reshape(B * N0, C)
                    cu = torch.arange(B + 1, device=x.device, dtype=torch.int32) * N0
                    max_len, n_pkg = N0, 0
                    if return_info:  # -1 = a prefix row
                        patch_id = torch.arange(-self.num_prefix, P, device=x.device).clamp(min=-1).repeat(B)
                x, cu, src = self._prune_stage_packed(s, x, cu, n_pkg, P)
                # An upper bound on the longest image, known without a synchronisation.
                n_pkg_new = cfg.num_packages_after(s)
                if cfg.pruning == "topk":
                    max_len = self.num_prefix + self.num_keep(s, P) + n_pkg_new
                else:
                    max_len = max_len + n_pkg_new - n_pkg
                n_pkg = n_pkg_new
                if return_info:
                    # -2 marks the new (or merged) package rows (src -1) and the old package rows
                    patch_id = torch.where(src >= 0, patch_id[src.clamp(min=0)], torch.full_like(src, -2))
                    stage_rows.append((cu, patch_id))
            x = block(x) if cu is None else packed_block(block, x, cu, max_len)
        logits = self._head_packed(x, cu, n_pkg)
        if not return_info:
            return logits
        return logits, self._packed_info(stage_rows)

    @staticmethod
    def check_accelerable(model):
        """Raise ValueError if `model` (the reference model about to become this class) cannot run packed."""
        for i, block in enumerate(model.vit.blocks):
            attn = block.attn
            if attn.head_dim not in HEAD_DIMS:
                raise ValueError(f"model: block {i} has head dim {attn.head_dim}; varlen_attention supports "
                                 f"{', '.join(map(str, HEAD_DIMS))}")

    def _prune_stage_packed(self, stage, x, cu, n_pkg, P):
        """Score and prune one stage on packed rows. Returns (x_out, cu_seqlens_out, src_index)."""
        cfg = self.config
        keep_score, keep_prob = torch.ops.spvit.token_scores(
            x, cu, n_pkg, self.num_heads, *self.selectors[stage].op_weights(), num_prefix=self.num_prefix)
        num_keep = self.num_keep(stage, P) if cfg.pruning == "topk" else None
        return torch.ops.spvit.prune_pack(x, cu, keep_score, keep_prob, n_pkg, cfg.pruning, cfg.threshold_at(stage),
                                          num_keep, cfg.package, package_merge=cfg.package_merge,
                                          num_prefix=self.num_prefix)

    @staticmethod
    def _row_layout(x, cu):
        """For packed rows x (T, C) with cu_seqlens cu: (image id of every row (T,), its position inside
        the image (T,), the image lengths (B,)), all int64, computed without a host synchronisation."""
        B, T = cu.shape[0] - 1, x.shape[0]
        lengths = cu.diff().long()
        image = torch.repeat_interleave(torch.arange(B, device=x.device), lengths, output_size=T)
        pos = torch.arange(T, device=x.device) - cu[:-1].long()[image]
        return image, pos, lengths

    def _head_packed(self, x, cu, num_packages):
        """Logits from the final packed rows x (T, C) (image b = rows cu[b] .. cu[b+1]-1, prefix rows first,
        num_packages package rows last). The prefix rows are gathered; the "avg" head's mean over the other
        rows is one segment sum (index_add_ by image id): no loop over images, no host synchronisation."""
        n = self.num_prefix
        B = cu.shape[0] - 1
        starts = cu[:-1].long()
        prefix = self.final_norm(x[starts[:, None] + torch.arange(n, device=x.device)])  # (B, n, C)
        if self.head_kind != "avg":
            return self.forward_head(prefix, None)
        image, pos, lengths = self._row_layout(x, cu)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = torch.where((pos >= n)[:, None], self.final_norm(x).to(acc), 0)
        total = torch.zeros(B, x.shape[1], dtype=acc, device=x.device).index_add_(0, image, rows)
        pooled = total / (lengths - n).clamp(min=1)[:, None].to(acc)
        return self.forward_head(prefix, pooled.to(x.dtype))

    def _packed_info(self, stage_rows):
        kept = []
        for cu, patch_id in stage_rows:
            bounds = cu.tolist()
            ids = patch_id.cpu()
            kept.append([ids[a:b][ids[a:b] >= 0] for a, b in zip(bounds[:-1], bounds[1:])])
        return self._info_dict(kept)


# reference model class -> its accelerated class (accelerate() swaps __class__; the modules stay).
ACCELERATED = {SPViT: AcceleratedSPViT}


def accelerate(model):
    """Switch `model` (an SPViT from spvit_kernels.models.create_model / from_timm / from_lvvit: a class
    in ACCELERATED) in place to pruned ragged execution on the fused ops, and return it (an already
    accelerated model is returned as is). Parameters, buffers and state_dict are unchanged;
    only the forward changes. Works on CPU (C++ backends) and CUDA (Triton / CUDA C++), in float32,
    float16 and bfloat16 and under torch.autocast."""
    if type(model) in ACCELERATED.values():
        return model
    if type(model) not in ACCELERATED:
        raise TypeError(f"model must be an SPViT model from spvit_kernels.models, got {type(model).__name__}")
    ACCELERATED[type(model)].check_accelerable(model)
    model.__class__ = ACCELERATED[type(model)]
    return model


# The other families' accelerated classes build on AcceleratedSPViT, hence imported after it.
from ..models.lvvit import SPViTLVViT  # noqa: E402
from .lvvit import AcceleratedLVViT  # noqa: E402

ACCELERATED[SPViTLVViT] = AcceleratedLVViT

from ..models.pit import SPViTPiT  # noqa: E402
from .pit import AcceleratedPiT  # noqa: E402

ACCELERATED[SPViTPiT] = AcceleratedPiT
