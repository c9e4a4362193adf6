"""SPViT's training loss (design section 8; the paper code's DistillDiffPruningLoss) and the teacher's outputs.

    loss = clf_weight     * base(logits, targets)
         + ratio_weight   * sum_s (mean(decisions[s]) - r_s)^2 / S
         [+ sum_s lambda_s * (mean(decisions[s]) - r_s) / S]    lambda_s >= 0; optional, not in the paper
         + distill_weight * KL(student || teacher logits)           log-softmax both, batchmean, log_target
         + distill_weight * token loss on the rows where decision > 0.5   (MSE, or KL over channels)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SPViTLoss", "teacher_outputs"]

TOKEN_LOSSES = ("mse", "kl")
COMPONENTS = ("clf", "ratio", "cls_kl", "token")


def teacher_outputs(teacher, images):
    """The dense teacher's (logits (B, K), tokens (B, P, C)): the final-normed rows of the spatial tokens.

    A timm VisionTransformer (or distilled / register / class-free one) is read through forward_features /
    forward_head; a timm PiT through its stages (tokens: the last grid, normed like the class row); the
    library's LVViT through embed / blocks / norm; any other module must return (logits, tokens). The ViT's and
    the LVViT's blocks run through the fused norms and MLPs where those serve them (on a GPU)."""
    from timm.models.pit import PoolingVisionTransformer
    from timm.models.vision_transformer import VisionTransformer

    from ..models.lvvit import LVViT

    if isinstance(teacher, VisionTransformer):
        feats = _fused_vit_features(teacher, images)
        if feats is None:
            feats = teacher.forward_features(images)
        return teacher.forward_head(feats), feats[:, teacher.num_prefix_tokens:]
    if isinstance(teacher, PoolingVisionTransformer):
        x = teacher.pos_drop(teacher.patch_embed(images) + teacher.pos_embed)
        grid, cls = teacher.transformers((x, teacher.cls_token.expand(x.shape[0], -1, -1)))
        return teacher.forward_head(teacher.norm(cls)), teacher.norm(grid.flatten(2).transpose(1, 2))
    if isinstance(teacher, LVViT):
        x = teacher.embed(images)
        if _fusable(teacher.blocks, x):
            x = _fused_blocks_norm(teacher.blocks, x, teacher.norm)
        else:
            for block in teacher.blocks:
                x = block(x)
            x = teacher.norm(x)
        return teacher.forward_head(x), x[:, 1:]
    out = teacher(images)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
        raise TypeError("teacher must be a timm ViT / PiT, an LVViT, or a module returning (logits, tokens); "
                        f"it returned {type(out).__name__}")
    return tuple(out)


def _fusable(blocks, x):
    """Whether the fused norms serve these blocks on x: timm Blocks (any layer scale: LV-ViT's divides by skip_lam)
    whose norm the add_layer_norm backend takes on x's device (CUDA with Triton)."""
    from timm.models.vision_transformer import Block

    from ..models import add_norm as fused

    return (len(blocks) > 0 and all(type(b) is Block for b in blocks)
            and fused.fused_backend(blocks[0].norm1, x.new_empty((0, x.shape[-1]))) is not None)


def _fused_blocks_norm(blocks, x, norm):
    """norm(blocks(x)) with every residual add fused into the LayerNorm that reads it (the last one into `norm`;
    models/add_norm.py) and GELU into each MLP's fc2 (models/fused_mlp.py); for blocks that `_fusable` admits."""
    from ..models import add_norm as fused
    from ..models.fused_mlp import mlp_forward
    from ..models.timm_block import blocks_forward_carried

    x, pending = blocks_forward_carried(blocks, x, lambda attn, h: attn(h), fused.add_norm, mlp_forward)
    return fused.add_norm(norm, x, *pending)[1]


def _fused_vit_features(teacher, images):
    """timm's forward_features through _fused_blocks_norm where the fused ops serve it; None elsewhere (the caller
    runs forward_features)."""
    if not hasattr(teacher, "_pos_embed") or not _fusable(teacher.blocks, images.new_empty((0, teacher.embed_dim))):
        return None
    x = teacher.norm_pre(teacher.patch_drop(teacher._pos_embed(teacher.patch_embed(images))))
    return _fused_blocks_norm(teacher.blocks, x, teacher.norm)


def _f32(t):
    """16-bit tensors upcast to float32 for the loss terms; float32 / float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _default_base(logits, targets):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if targets.dim() == 2 and targets.dtype.is_floating_point:  # mixup / cutmix soft targets
        return SoftTargetCrossEntropy()(logits, targets)
    return LabelSmoothingCrossEntropy(smoothing=0.1)(logits, targets)


class SPViTLoss(nn.Module):
    """The SPViT training loss. `loss(images, output, targets)` -> scalar tensor; `loss.last` holds the float
    components of the last call: clf, ratio, cls_kl, token, total (unweighted terms, and the weighted total).

    Args:
        teacher: the dense backbone (see `teacher_outputs`), run in eval mode under no_grad; None drops the two
            distillation terms (the paper code's DiffPruningLoss).
        keep_ratios: the target keep ratio of each stage (cumulative for DeiT / LV-ViT, per stage grid for PiT),
            one per entry of output.decisions.
        base_criterion: callable (logits, targets) -> loss; None = soft-target cross-entropy for (B, K) float
            targets (mixup / cutmix), label-smoothing 0.1 cross-entropy for class indices.
        clf_weight, ratio_weight, distill_weight: the weights (paper: 1, 2, 0.5).
        token_loss: "mse" (DeiT) or "kl" (LV-ViT: KL over the channels of each kept row, batchmean).
        ratio_multiplier_lr: 0 (the paper's loss) or the step size eta of a Lagrange multiplier per stage for the
            budget "kept ratio <= target": the loss gains sum_s lambda_s * (mean_s - r_s) / S, and after each step
            the training loop calls `update_multipliers` with the step's kept ratios, lambda_s = max(0, lambda_s +
            eta * (kept_s - r_s)). A quadratic penalty alone settles where the task's pull towards more tokens
            balances it, which on small images can be far above the target; the multiplier grows while the
            ratio is above it. It stays >= 0 (the quadratic term alone lifts a ratio below its target): a
            multiplier that went negative while the selectors start below the targets would later push them over.
            The multipliers are the float64 buffer `ratio_multipliers` (S,); the train command checkpoints them.
    Raises FloatingPointError naming the component when a term is not finite.
    """

    def __init__(self, teacher, keep_ratios, base_criterion=None, clf_weight=1.0, ratio_weight=2.0,
                 distill_weight=0.5, token_loss="mse", ratio_multiplier_lr=0.0):
        super().__init__()
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        try:
            ratios = tuple(float(r) for r in keep_ratios)
        except (TypeError, ValueError):
            raise TypeError(f"keep_ratios must be a sequence of numbers, got {keep_ratios!r}") from None
        if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"keep_ratios must be one or more ratios in (0, 1], got {ratios}")
        if token_loss not in TOKEN_LOSSES:
            raise ValueError(f"token_loss must be one of {TOKEN_LOSSES}, got {token_loss!r}")
        for name, w in (("clf_weight", clf_weight), ("ratio_weight", ratio_weight),
                        ("distill_weight", distill_weight), ("ratio_multiplier_lr", ratio_multiplier_lr)):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.keep_ratios = ratios
        self.base_criterion = base_criterion or _default_base
        self.clf_weight, self.ratio_weight, self.distill_weight = float(clf_weight), float(ratio_weight), \
            float(distill_weight)
        self.token_loss = token_loss
        self.ratio_multiplier_lr = float(ratio_multiplier_lr)
        # float64: a multiplier summed over many steps of small corrections should not lose them to rounding.
        self.register_buffer("ratio_multipliers", torch.zeros(len(ratios), dtype=torch.float64), persistent=False)
        self._terms, self._last = {}, None

    @torch.no_grad()
    def update_multipliers(self, kept):
        """One projected dual-ascent step: lambda_s = max(0, lambda_s + ratio_multiplier_lr * (kept[s] - r_s)), with
        kept the step's mean kept ratio per stage (floats; under data parallelism, the mean over the ranks, so
        that every rank holds the same multipliers). A no-op when ratio_multiplier_lr is 0."""
        if self.ratio_multiplier_lr == 0.0:
            return
        if len(kept) != len(self.keep_ratios):
            raise ValueError(f"kept has {len(kept)} ratios but keep_ratios has {len(self.keep_ratios)}")
        step = torch.tensor([k - r for k, r in zip(kept, self.keep_ratios)], dtype=torch.float64)
        self.ratio_multipliers += self.ratio_multiplier_lr * step.to(self.ratio_multipliers.device)
        self.ratio_multipliers.clamp_(min=0.0)

    def train(self, mode=True):
        """Keeps the teacher in eval mode whatever mode the loss module is put in."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images, output, targets):
        """images: what the student saw (B, ...); output: the student's TrainOutput; targets: (B,) class indices
        or (B, K) soft targets. Returns the scalar loss."""
        logits, tokens, decision, decisions = output
        if len(decisions) != len(self.keep_ratios):
            raise ValueError(f"keep_ratios has {len(self.keep_ratios)} ratios but the model has {len(decisions)} "
                             "stages")
        clf = self.base_criterion(logits, targets)
        ratio = sum((d.mean() - r) ** 2 for d, r in zip(decisions, self.keep_ratios)) / len(decisions)
        terms = {"clf": clf, "ratio": ratio}
        total = self.clf_weight * clf + self.ratio_weight * ratio
        if self.ratio_multiplier_lr:
            lam = self.ratio_multipliers
            total = total + sum(lam[s].to(device=d.device, dtype=_f32(d).dtype) * (_f32(d).mean() - r) for s, (d, r) in
                                enumerate(zip(decisions, self.keep_ratios))) / len(decisions)
        if self.teacher is not None:
            with torch.no_grad():
                t_logits, t_tokens = teacher_outputs(self.teacher, images)
            if t_tokens.shape != tokens.shape:
                raise ValueError(f"teacher: its tokens have shape {tuple(t_tokens.shape)} but the student's have "
                                 f"{tuple(tokens.shape)} (same backbone size, image and patch size?)")
            if t_logits.shape != logits.shape:
                raise ValueError(f"teacher: its logits have shape {tuple(t_logits.shape)} but the student's have "
                                 f"{tuple(logits.shape)}")
            cls_kl = F.kl_div(F.log_softmax(_f32(logits), dim=-1), F.log_softmax(_f32(t_logits), dim=-1),
                              reduction="batchmean", log_target=True)
            terms["cls_kl"] = cls_kl
            terms["token"] = self._token_term(tokens, t_tokens, decision)
            total = total + self.distill_weight * (cls_kl + terms["token"])
        terms["total"] = total
        self._terms, self._last = {name: t.detach() for name, t in terms.items()}, None
        if not torch.compiler.is_compiling():  # eager: fail at once; a compiled step is checked when `last` is read
            self._check_finite()
        return total

    @property
    def last(self):
        """The last call's components as floats: clf, ratio (, cls_kl, token with a teacher), total. Read from
        the tensors once per call (one device synchronisation), however often it is read."""
        if self._last is None:
            self._last = {name: float(t) for name, t in self._terms.items()}
        return self._last

    def _check_finite(self):
        last = self.last
        for name in COMPONENTS:
            if name in last and not math.isfinite(last[name]):
                raise FloatingPointError(f"SPViTLoss: the {name} term is {last[name]} (not finite)")
        if "total" in last and not math.isfinite(last["total"]):
            raise FloatingPointError(f"SPViTLoss: the total is {last['total']} (not finite)")

    def _token_term(self, tokens, t_tokens, decision):
        """The token distillation term over the rows the last stage kept (decision > 0.5); 0 if none is."""
        B, P, C = tokens.shape
        # Rows weighted by the keep mask, not indexed by it: the same value as the mean over the kept rows, with
        # shapes that do not depend on the data (a torch.compile fullgraph step); no kept row gives 0.
        kept = decision.reshape(B * P, 1) > 0.5
        count = kept.sum()
        student, teacher = _f32(tokens.reshape(B * P, C)), _f32(t_tokens.reshape(B * P, C))
        if self.token_loss == "mse":
            per_row = (student - teacher).pow(2).sum(dim=-1, keepdim=True) / C
        else:
            per_row = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="none",
                               log_target=True).sum(dim=-1, keepdim=True)
        return torch.where(kept, per_row, 0).sum() / count.clamp(min=1)
