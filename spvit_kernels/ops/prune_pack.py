"""torch.ops.spvit.prune_pack: keep decision, gather of kept rows and package-token pooling."""

import torch

from .. import reference
from . import _library, _registry, _validate

OP = "prune_pack"
_ANY_DEVICE = lambda: {"cpu", "cuda"}  # noqa: E731

_registry.register_backend(OP, "reference", _ANY_DEVICE)(reference.prune_pack_reference)


def _check(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold=0.0, num_keep=None,
           package="mean", package_merge="concat", num_prefix=1, *, allow_sync, allow_float64=False):
    total_rows = _validate.prune_pack(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold,
                                      num_keep, package, package_merge, num_prefix,
                                      allow_sync=allow_sync, allow_float64=allow_float64)
    return (x, _validate.dense_seqlens(cu_seqlens), keep_score, keep_prob, num_packages, mode, float(threshold),
            num_keep, package, total_rows, package_merge, num_prefix)


def prune_pack(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold=0.0, num_keep=None,
               package="mean", *, package_merge="concat", num_prefix=1, backend=None):
    """Drop the weak spatial tokens of every image and pool them into a package token.

    Image b's rows (cu_seqlens[b] .. cu_seqlens[b+1]-1) are [num_prefix prefix rows, n_b spatial
    candidates, num_packages package rows]. Only the candidates can be dropped.

    Args:
        x: (T, C) tokens, float32 / float16 / bfloat16, rows contiguous.
        cu_seqlens: (B+1,) int32 on x's device.
        keep_score: (T,) float32, e.g. from token_scores (only candidate rows are read).
        keep_prob: (T,) float32 pooling weights of dropped rows.
        num_packages: package rows at the end of every image.
        mode: "threshold" (keep iff keep_score > threshold; NaN never kept) or "topk" (keep the
            min(num_keep, n_b) best; ties to the lower index, NaN ranks lowest; see the output size below).
        threshold: the threshold of mode="threshold".
        num_keep: candidates kept per image in mode="topk" (0 <= num_keep < 2**31).
        package: "mean" (keep_prob-weighted average of the dropped rows; zero if none or zero weight),
            "sum" (keep_prob-weighted sum), "none" (no new package row). Accumulated in float32.
        package_merge: "concat" (the new package row is appended after the old ones) or "add" (one
            package row per image in total: with num_packages = 0 the new row is appended, with
            num_packages = 1 the pooled row is added to the old package row in float32 and the sum
            replaces it). "add" needs package != "none" and num_packages 0 or 1.
        num_prefix: rows at the start of every image that are always kept and never pooled (class,
            distillation, register tokens; 0 for a model without class token). Default 1.
        backend: None (fastest for the device), "reference", "cpu", "cuda".

    Returns:
        x_out: (T_out, C) in x's dtype; image b's rows are [prefix rows, kept candidates in original
            order, old package rows, new package row (unless package="none")], or in "add" mode
            [prefix rows, kept candidates, the one (merged) package row].
        cu_seqlens_out: (B+1,) int32.
        src_index: (T_out,) int64, the row of x each output row copies; -1 for new and merged package rows
            (and for the zero rows after cu_seqlens_out[-1] in top-k mode).

    Output size in top-k mode: fixed by the shapes alone, B * (num_prefix + k + package rows) rows with
    k = min(num_keep, T - B * (num_prefix + num_packages)) (the most candidates one image can have) and
    package rows = 1 in "add" mode, else num_packages + the new row, on every backend, eager and under
    torch.compile alike, so top-k needs no synchronisation and can be captured in a CUDA graph. When an
    image has fewer than k candidates (it keeps them all), the rows after cu_seqlens_out[-1], which no
    image owns, are zero rows with src_index -1. Equal-length images with at least num_keep candidates
    (every SPViT model) fill every row. Threshold mode copies the output size to the host once.

    Errors: bad arguments raise a ValueError / TypeError naming the argument (also num_keep so large that
    the output would pass int32 rows). The raw torch.ops.spvit.prune_pack entry point runs the same checks
    except those on cu_seqlens' values on a GPU, and a schema type mismatch there is torch's RuntimeError.
    """
    args = (x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold, num_keep, package, package_merge,
            num_prefix)
    if (torch.is_tensor(x) and x.device.type == "meta" and mode == "threshold"
            and not torch.compiler.is_compiling()):
        raise ValueError("x is a meta tensor: in mode='threshold' the output's row count depends on keep_score's "
                         "values, which meta tensors do not have (mode='topk' has a fixed size; torch.compile / "
                         "FakeTensorMode trace threshold mode with a data-dependent size)")
    return _library.call(OP, args, backend, _check)


_library.register_dispatch(OP, _check)


@torch.library.register_fake("spvit::prune_pack")
def _prune_pack_fake(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold=0.0, num_keep=None,
                     package="mean", package_merge="concat", num_prefix=1):
    # Also what a call with a tensor on `meta` reaches: the same checks (devices included) as the kernels.
    _check(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold, num_keep, package, package_merge,
           num_prefix, allow_sync=False)
    B = cu_seqlens.shape[0] - 1
    if mode == "topk":
        rows = _validate.topk_output_rows(B, x.shape[0], num_packages, package, num_keep, package_merge, num_prefix)
    else:
        rows = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((rows, x.shape[1])), cu_seqlens.new_empty((B + 1,)),
            x.new_empty((rows,), dtype=torch.int64))
