"""The paper's fine-tuning recipe (design section 8): optimiser parameter groups and the per-epoch lr schedule.

The paper code (main_l2_vit_3keep_senet.py) trains the selectors with a cosine schedule from the linearly scaled
lr (5e-4 * global batch / 512) to 1e-5, keeps the backbone at lr 0 for 5 warm-up epochs and then at
min(0.01 * lr, selector lr), and never updates the class token or the position embedding. The schedule is set
once per epoch, as the paper code steps it.
"""

import math

__all__ = ["FROZEN_NAMES", "SELECTOR_PREFIX", "lr_at_epoch", "param_groups", "scaled_lr", "set_lr"]

SELECTOR_PREFIX = "selectors."
# Backbone parameters the recipe freezes, by the last part of their name (timm / LV-ViT / PiT spellings).
FROZEN_NAMES = ("cls_token", "pos_embed")
GROUP_NAMES = ("selectors", "selectors_no_decay", "backbone", "backbone_no_decay")


def _no_decay(name, param):
    # Biases and norm weights (every 1-D parameter) get no weight decay.
    return param.dim() <= 1 or name.endswith(".bias")


def param_groups(model, weight_decay=0.05, freeze=FROZEN_NAMES):
    """AdamW parameter groups of an SPViT model, each with a "name" that `set_lr` reads.

    Groups: "selectors" / "selectors_no_decay" (the token selectors), "backbone" / "backbone_no_decay"
    (everything else). Weight decay `weight_decay` on matrices, none on biases and norms. Parameters whose
    name ends in one of `freeze` (the class token and position embedding) are frozen: their requires_grad is
    set to False and they are left out, as are parameters that are already frozen. Empty groups are dropped.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        if any(name == f or name.endswith("." + f) for f in freeze):
            param.requires_grad_(False)
        if not param.requires_grad:
            continue
        kind = "selectors" if name.startswith(SELECTOR_PREFIX) else "backbone"
        groups[kind + ("_no_decay" if _no_decay(name, param) else "")].append(param)
    return [{"params": params, "name": name, "weight_decay": 0.0 if name.endswith("_no_decay") else weight_decay}
            for name, params in groups.items() if params]


def scaled_lr(base_lr, global_batch):
    """The paper's linear scaling: base_lr * global_batch / 512 (global batch = per-process batch x processes x
    accumulation steps)."""
    return base_lr * global_batch / 512.0


def lr_at_epoch(epoch, epochs, lr, min_lr=1e-5, warmup_epochs=5):
    """(selector lr, backbone lr) of `epoch` (0-based) of `epochs`: the selectors follow a cosine from `lr` to
    `min_lr`, min_lr + (lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2; the backbone gets 0 for the first
    `warmup_epochs` epochs, then min(0.01 * lr, the selector lr)."""
    if epochs <= 0:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    selector = min_lr + (lr - min_lr) * (math.cos(epoch / epochs * math.pi) + 1) * 0.5
    backbone = 0.0 if epoch < warmup_epochs else min(0.01 * lr, selector)
    return selector, backbone


def set_lr(optimizer, selector_lr, backbone_lr):
    """Set the lr of every group from `param_groups`: selector groups get selector_lr, the others backbone_lr."""
    for group in optimizer.param_groups:
        group["lr"] = selector_lr if group.get("name", "").startswith("selectors") else backbone_lr
