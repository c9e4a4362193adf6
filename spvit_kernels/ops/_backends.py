"""Imports the modules that register the fast backends (C++, CUDA C++, Triton) of the ops."""
from . import varlen_attention_backends  # noqa: F401,E402
from . import token_scores_backends  # noqa: F401,E402
from . import prune_pack_backends  # noqa: F401,E402
