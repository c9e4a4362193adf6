"""Reference SPViT models (SPEC sections 2 and 5): timm DeiT/ViT + token selectors, official masked form.

    create_model(name, **cfg) -> SPViT      spvit_deit_tiny / _small / _base / _256 / _320, random init
    from_timm(vit, **cfg) -> SPViT          add selectors to an existing timm VisionTransformer
    SPViT, TokenSelector, SPViTConfig       the modules and the pruning configuration
    calibrate_thresholds(model, images)     per-stage thresholds whose mean keep matches the keep ratios
    load_checkpoint(model, path_or_sd)      trained weights: our state_dict, the paper code's format, a backbone
    to_paper_state_dict(model)              the weights in the paper code's layout

Inference only: training (Gumbel / soft masks) is not provided.
"""

from .calibrate import calibrate_thresholds
from .checkpoint import CheckpointError, CheckpointFormat, load_checkpoint, to_paper_state_dict
from .config import SPViTConfig, make_config
from .factory import MODEL_SHAPES, create_model, from_timm, list_models
from .selector import TokenSelector
from .spvit import SPViT

__all__ = ["MODEL_SHAPES", "CheckpointError", "CheckpointFormat", "SPViT", "SPViTConfig", "TokenSelector", "calibrate_thresholds", "create_model",
           "from_timm", "list_models", "load_checkpoint", "make_config", "to_paper_state_dict"]
