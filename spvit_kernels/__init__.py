"""spvit_kernels: fused kernels that make token-pruned (SPViT) Vision Transformers run on fewer tokens.

    spvit_kernels.ops          torch.ops.spvit.* (token_scores, prune_pack, varlen_attention) with backends
    spvit_kernels.models       reference SPViT models on timm (create_model, from_timm)
    spvit_kernels.accelerate   switch a reference model in place to pruned ragged execution
    spvit_kernels.calibrate_thresholds   per-stage thresholds for threshold pruning (from spvit_kernels.models)
"""

from . import models, ops  # models imports timm
from .accelerate import accelerate
from .models import calibrate_thresholds
from .version import __version__

__all__ = ["__version__", "accelerate", "calibrate_thresholds", "models", "ops"]
