"""The spvit ops: `torch.ops.spvit.*` and their Python front ends with a `backend=` switch.

    token_scores(x, cu_seqlens, num_packages, num_heads, <14 selector weights>, *, num_prefix=1)
        -> (keep_score, keep_prob)
    prune_pack(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, ..., *, package_merge="concat",
               num_prefix=1) -> (x_out, cu_seqlens_out, src_index)
    varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None) -> out
    policy_attention(q, k, v, policy, eps=1e-6, softmax_scale=None) -> out      (training; differentiable)
    selector_train(S, weights, num_heads, <14 selector weights>) -> (score, prob)  (training; differentiable)
    add_layer_norm(x, branch, weight, bias, eps=1e-5, out_dtype=None) -> (s, y)  (residual add + LayerNorm;
                                                                                  differentiable)
    gelu_mlp(h, w1, b1, w2, b2) -> out         (a transformer MLP, GELU in the GEMM epilogues; differentiable)

`available_backends(name)` lists the backends usable in this process. `simt_schedule(seed)` sets the thread
order of the `cuda_simt` backends (the CUDA C++ kernels run on the CPU, see spvit_kernels.ops.simt).
"""

from ._registry import available_backends
from .add_layer_norm import add_layer_norm
from .gelu_mlp import gelu_mlp
from ._validate import unchecked_seqlens
from .policy_attention import policy_attention
from .prune_pack import prune_pack
from .selector_train import selector_train
from .simt import simt_schedule
from .token_scores import token_scores
from .varlen_attention import varlen_attention
from . import _backends  # noqa: F401,E402  (registers the fast backends)

__all__ = ["add_layer_norm", "available_backends", "gelu_mlp", "policy_attention", "prune_pack", "selector_train",
           "simt_schedule", "token_scores", "unchecked_seqlens", "varlen_attention"]
