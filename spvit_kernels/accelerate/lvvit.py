"""The accelerated LV-ViT SPViT model: AcceleratedSPViT's packed forward with SPViTLVViT's head (the
aux-head max as a segment max over each image's alive patch rows)."""

from ..models.lvvit import SPViTLVViT
from . import AcceleratedSPViT


class AcceleratedLVViT(SPViTLVViT, AcceleratedSPViT):
    """An SPViTLVViT whose forward runs on the pruned ragged batch (see AcceleratedSPViT)."""
