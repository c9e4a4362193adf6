"""spvit_kernels: fused kernels that make token-pruned (SPViT) Vision Transformers run on fewer tokens."""

from . import ops
from .version import __version__

__all__ = ["__version__", "ops"]
