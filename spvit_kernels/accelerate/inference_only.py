"""The accelerated model's packed path (eval mode) is inference-only; this keeps a forward with autograd enabled
from giving silently wrong gradients.

The fused ops have no backward formulas, so a forward that autograd records would give gradients to some
parameters (the head) and none to others (the patch embedding, everything before the first selector's
prune_pack). Instead the forward runs without recording, and when autograd would have recorded (grad mode
on and a parameter or the images require grad) the logits come out of `InferenceOnly`, an autograd node
whose backward raises. A forward with grad mode on (common in inference code) still works.
"""

import torch

MESSAGE = ("accelerated SPViT is inference-only: its fused ops (token_scores, prune_pack, varlen_attention) "
           "have no backward, so gradients through it would be wrong. Differentiate the reference model "
           "instead, or run the forward under torch.no_grad() / torch.inference_mode().")


class InferenceOnly(torch.autograd.Function):
    """logits -> a copy of logits whose backward raises a RuntimeError (`MESSAGE`). `anchor` is any tensor that
    requires grad (a parameter or the images), so that the output is part of the autograd graph."""

    @staticmethod
    def forward(ctx, logits, anchor):
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(MESSAGE)


def would_record(module, images):
    """The tensor autograd would record the forward for (a parameter or `images` requiring grad), else None."""
    if not torch.is_grad_enabled():
        return None
    if images.requires_grad:
        return images
    return next((p for p in module.parameters() if p.requires_grad), None)
