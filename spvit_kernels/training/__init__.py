"""Training the token selectors as the paper code does (design section 8).

    model.train(); out = model(images)            -> TrainOutput(logits, tokens, decision, decisions)
    SPViTLoss(teacher, keep_ratios)(images, out, targets)   classification + ratio + logit KL + token loss
    param_groups(model), lr_at_epoch(...), set_lr(...)      the paper's optimiser groups and schedule
    policy_attention(q, k, v, policy, eps)                  the training attention (fused autograd form)
    with fused_kernels(False): ...                          the PyTorch forms instead of the fused GPU kernels
"""

from .._fusion import fused_kernels
from .loss import SPViTLoss, teacher_outputs
from .output import TrainOutput
from .policy_attention import policy_attention, policy_attention_reference
from .recipe import lr_at_epoch, param_groups, scaled_lr, set_lr

__all__ = ["SPViTLoss", "TrainOutput", "fused_kernels", "lr_at_epoch", "param_groups", "policy_attention",
           "policy_attention_reference", "scaled_lr", "set_lr", "teacher_outputs"]
