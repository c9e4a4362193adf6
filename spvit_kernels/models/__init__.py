"""Reference SPViT models (design sections 2 and 5): timm DeiT/ViT + token selectors, official masked form.

    create_model(name, **cfg) -> SPViT      spvit_deit_tiny / _small / _base / _256 / _320 (and _distilled),
                                            spvit_lvvit_s / _m; random init
    from_timm(vit, **cfg) -> SPViT          add selectors to an existing timm VisionTransformer (class,
                                            distillation, register tokens; global_pool 'token' or 'avg')
    LVViT, from_lvvit(vit, **cfg)           the LV-ViT backbone (published parameter names) and its SPViT
    SPViTPiT, from_timm_pit(pit, **cfg)     SPViT on a timm PiT (spvit_pit_ti / _xs / _s; from_timm dispatches)
    SPViT, TokenSelector, SPViTConfig       the modules and the pruning configuration
    calibrate_thresholds(model, images)     per-stage thresholds whose mean keep matches the keep ratios
    load_checkpoint(model, path_or_sd)      trained weights: our state_dict, the paper code's format, a backbone
    to_paper_state_dict(model)              the weights in the paper code's layout

In training mode every model runs the paper's training form and returns a TrainOutput (train_forward.py;
loss and recipe in spvit_kernels.training).
"""

from .calibrate import calibrate_thresholds
from .checkpoint import CheckpointError, CheckpointFormat, load_checkpoint, to_paper_state_dict
from .config import SPViTConfig, make_config
from .factory import MODEL_SHAPES, MODELS, create_model, from_timm, list_models
from .lvvit import LVViT, SPViTLVViT, from_lvvit
from .pit import SPViTPiT, from_timm_pit
from .selector import TokenSelector
from .spvit import SPViT
from .train_forward import TrainOutput

__all__ = ["LVViT", "MODELS", "MODEL_SHAPES", "CheckpointError", "CheckpointFormat", "SPViT", "SPViTConfig",
           "SPViTLVViT", "SPViTPiT", "TokenSelector", "TrainOutput", "calibrate_thresholds", "create_model", "from_lvvit",
           "from_timm_pit", "from_timm", "list_models", "load_checkpoint", "make_config", "to_paper_state_dict"]
