"""Pure-PyTorch reference implementations of the spvit ops (the `"reference"` backend).

They follow design section 2 literally, image by image, and compute in float32 (float64 for float64
inputs), so they double as the float64 oracle of the tests.
"""

from .prune_pack import prune_pack_reference
from .token_scores import selector_rows, token_scores_reference
from .varlen_attention import varlen_attention_reference

__all__ = ["prune_pack_reference", "selector_rows", "token_scores_reference", "varlen_attention_reference"]
