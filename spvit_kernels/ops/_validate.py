"""Argument checks for the spvit ops: one routine per op, shared by every backend.

Each check raises a ValueError (bad value or shape) or TypeError (bad dtype / type) whose message starts
with the argument's name. The checks never synchronise with the GPU except `read_seqlens` on a CUDA
`cu_seqlens` (one small device-to-host copy), which is skipped where a synchronisation is not allowed:
under CUDA graph capture, while torch.compile traces, inside `unchecked_seqlens()` (used by the
accelerated models, whose cu_seqlens come from the ops themselves), and in the raw `torch.ops.spvit.*`
entry points. Where it is skipped, the kernels still clamp every segment to [0, T], so bad values can
give wrong numbers but never an out-of-bounds access.

The same checks run in the ops' fake implementations, which is also what a raw call reaches when one of its
tensors is on `meta`: a mix of devices raises there too instead of returning uninitialised tensors.
"""

import contextlib
import math
import threading

import torch
from torch._subclasses.fake_tensor import is_fake

TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 80, 96, 128)
# policy_attention's Triton kernels pad the head dim to a power of two >= 16 (tl.dot's smallest tile).
POLICY_HEAD_DIMS = tuple(range(16, 129))
# selector_train's Triton kernels pad the head dim (a multiple of 4) to a power of two >= 16, up to 128.
SELECTOR_TRAIN_TRITON_HEAD_DIMS = tuple(range(4, 129, 4))
PRUNE_MODES = ("threshold", "topk")
PACKAGE_MODES = ("none", "sum", "mean")
PACKAGE_MERGES = ("concat", "add")

_state = threading.local()


@contextlib.contextmanager
def unchecked_seqlens():
    """Within this block, cu_seqlens on a GPU are trusted: their values are not copied to the host."""
    prev = getattr(_state, "unchecked", False)
    _state.unchecked = True
    try:
        yield
    finally:
        _state.unchecked = prev


def _is_fake(t):
    """Fake (torch.compile tracing) and meta tensors have no values to read."""
    return t.device.type == "meta" or is_fake(t)


def values_readable(t, allow_sync):
    """Whether the values of the small index tensor `t` may be read on the host now."""
    if _is_fake(t):
        return False
    if t.device.type == "cpu":
        return True
    if not allow_sync or getattr(_state, "unchecked", False):
        return False
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_tensor(t, name, *, ndim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the tokens, got {t.device}")


# Row counts and indices of the outputs are int32 (cu_seqlens): no count may pass this.
INT32_MAX = 2**31 - 1


def check_int(v, name, *, minimum=None, maximum=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")


def check_seqlens_meta(cu_seqlens, device):
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have B+1 >= 2 entries, got {cu_seqlens.shape[0]}")


def dense_seqlens(cu_seqlens):
    """cu_seqlens as the backends read it: contiguous (a strided view, e.g. t[::2], is copied: B+1 ints).
    Every kernel indexes cu_seqlens[b] as a flat array, so this is done once here for all of them."""
    return cu_seqlens.contiguous()


def read_seqlens(cu_seqlens, total, *, num_prefix=0, num_packages=0, allow_sync=True):
    """Check cu_seqlens' values and return the per-image lengths (a list), or None if not readable now.

    cu_seqlens[0] must be 0, the sequence non-decreasing, cu_seqlens[-1] == total, and every image at
    least num_prefix + num_packages rows long (the error names whichever of the two does not fit).
    """
    if not values_readable(cu_seqlens, allow_sync):
        return None
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}] < cu_seqlens[{i}]")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of rows T = {total}, got {bounds[-1]}")
    min_len = num_prefix + num_packages
    for i, n in enumerate(lengths):
        if n < num_prefix:
            raise ValueError(f"num_prefix = {num_prefix} is larger than image {i}, which has {n} rows")
        if n < min_len:
            raise ValueError(
                f"num_packages: image {i} has {n} rows, fewer than the {min_len} it needs "
                f"({num_prefix} prefix + {num_packages} package rows)")
    return lengths


# --- token_scores ---------------------------------------------------------------------------------

TOKEN_SCORES_WEIGHTS = ("ln_weight", "ln_bias", "w_in", "b_in", "w1", "b1", "w2", "b2", "w3", "b3",
                        "se_w1", "se_b1", "se_w2", "se_b2")


def token_scores_weight_shapes(num_heads, head_dim):
    H, d = num_heads, head_dim
    return {
        "ln_weight": (d,), "ln_bias": (d,), "w_in": (d, d), "b_in": (d,),
        "w1": (d // 2, d), "b1": (d // 2,), "w2": (d // 4, d // 2), "b2": (d // 4,),
        "w3": (2, d // 4), "b3": (2,),
        "se_w1": (H // 2, H), "se_b1": (H // 2,), "se_w2": (H, H // 2), "se_b2": (H,),
    }


def token_scores(x, cu_seqlens, num_packages, num_heads, weights, num_prefix=1, *, allow_float64=False,
                 allow_sync=True):
    """Check token_scores' arguments; `weights` maps the names of TOKEN_SCORES_WEIGHTS to tensors.

    Returns the per-image lengths, or None where they cannot be read without a synchronisation.
    """
    dtypes = TOKEN_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(x, "x", ndim=2, dtypes=dtypes)
    check_seqlens_meta(cu_seqlens, x.device)
    check_int(num_packages, "num_packages", minimum=0)
    check_int(num_heads, "num_heads", minimum=2)
    check_int(num_prefix, "num_prefix", minimum=0)
    T, C = x.shape
    if C % num_heads != 0:
        raise ValueError(f"num_heads = {num_heads} must divide the channels C = {C} of x")
    d = C // num_heads
    if d % 4 != 0:
        raise ValueError(f"num_heads: the head dim C / num_heads = {d} must be a multiple of 4")
    if x.stride(1) != 1:
        raise ValueError("x must have contiguous rows (x.stride(1) == 1)")
    for name, shape in token_scores_weight_shapes(num_heads, d).items():
        w = weights[name]
        check_tensor(w, name, dtypes=(torch.float32, x.dtype), device=x.device)
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for C = {C}, num_heads = {num_heads}; "
                             f"got {tuple(w.shape)}")
    return read_seqlens(cu_seqlens, T, num_prefix=num_prefix, num_packages=num_packages, allow_sync=allow_sync)


# --- prune_pack -----------------------------------------------------------------------------------

def package_rows_out(num_packages, package, package_merge):
    """Package rows every output image carries: one in "add" mode, else the old ones plus the new one."""
    if package_merge == "add":
        return 1
    return num_packages + (package != "none")


def prune_pack(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold, num_keep, package,
               package_merge="concat", num_prefix=1, *, allow_float64=False, allow_sync=True):
    """Check prune_pack's arguments.

    Returns `total_rows`: the number of output rows where it is known without looking at the scores
    (top-k mode), else None (threshold mode: the backend counts the kept rows).
    """
    dtypes = TOKEN_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(x, "x", ndim=2, dtypes=dtypes)
    if x.stride(1) != 1:
        raise ValueError("x must have contiguous rows (x.stride(1) == 1)")
    check_seqlens_meta(cu_seqlens, x.device)
    T = x.shape[0]
    for name, t in (("keep_score", keep_score), ("keep_prob", keep_prob)):
        check_tensor(t, name, ndim=1, dtypes=(torch.float32,), device=x.device)
        if t.shape[0] != T:
            raise ValueError(f"{name} must have shape (T,) = ({T},) like x's rows, got {tuple(t.shape)}")
    check_int(num_packages, "num_packages", minimum=0, maximum=INT32_MAX)
    if mode not in PRUNE_MODES:
        raise ValueError(f"mode must be one of {PRUNE_MODES}, got {mode!r}")
    if package not in PACKAGE_MODES:
        raise ValueError(f"package must be one of {PACKAGE_MODES}, got {package!r}")
    if package_merge not in PACKAGE_MERGES:
        raise ValueError(f"package_merge must be one of {PACKAGE_MERGES}, got {package_merge!r}")
    if package_merge == "add":
        if package == "none":
            raise ValueError("package_merge='add' merges a new package row into the old one: it needs "
                             "package='mean' or 'sum', got package='none'")
        if num_packages not in (0, 1):
            raise ValueError(f"package_merge='add' keeps one package row per image: num_packages must be 0 or 1, "
                             f"got {num_packages}")
    check_int(num_prefix, "num_prefix", minimum=0)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if mode == "topk":
        if num_keep is None:
            raise ValueError("num_keep is required when mode='topk'")
        check_int(num_keep, "num_keep", minimum=0, maximum=INT32_MAX)
    elif num_keep is not None:
        check_int(num_keep, "num_keep", minimum=0, maximum=INT32_MAX)
    read_seqlens(cu_seqlens, T, num_prefix=num_prefix, num_packages=num_packages, allow_sync=allow_sync)
    if mode != "topk":
        return None
    # Top-k's output size is fixed by the shapes (what the fake, and so torch.compile, assumes), not by
    # the lengths: an image with fewer candidates than the others leaves zero rows (src_index -1) at the end.
    rows = topk_output_rows(cu_seqlens.shape[0] - 1, T, num_packages, package, num_keep, package_merge, num_prefix)
    if rows > INT32_MAX:
        raise ValueError(f"num_keep = {num_keep}: the top-k output would have {rows} rows, more than int32 "
                         "cu_seqlens can index")
    return rows


def topk_output_rows(B, T, num_packages, package, num_keep, package_merge="concat", num_prefix=1):
    """Rows of prune_pack's output in top-k mode, a function of the shapes only: B * (num_prefix + k + package
    rows out), k = min(num_keep, T - B * (num_prefix + num_packages)) (the most candidates one image can have).
    Works on the symbolic sizes of torch.compile too."""
    most = torch.sym_max(T - B * (num_prefix + num_packages), 0)
    return B * (num_prefix + package_rows_out(num_packages, package, package_merge) + torch.sym_min(num_keep, most))


# --- varlen_attention -----------------------------------------------------------------------------

def varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale, *, allow_float64=False, allow_sync=True):
    """Check varlen_attention's arguments. Returns (lengths or None, max_seqlen or None, softmax_scale)."""
    dtypes = TOKEN_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(q, "q", ndim=3, dtypes=dtypes)
    for name, t in (("k", k), ("v", v)):
        check_tensor(t, name, ndim=3, dtypes=(q.dtype,), device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension ({name}.stride(2) == 1)")
    T, H, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q: head dim {d} is not supported; expected one of {HEAD_DIMS}")
    check_seqlens_meta(cu_seqlens, q.device)
    if max_seqlen is not None:
        check_int(max_seqlen, "max_seqlen", minimum=0)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    elif not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    # Given max_seqlen, the op must not synchronise: cu_seqlens on a GPU are then not read back (CPU ones,
    # free to read, are still checked).
    if max_seqlen is not None and cu_seqlens.device.type != "cpu":
        allow_sync = False
    lengths = read_seqlens(cu_seqlens, T, allow_sync=allow_sync)
    if lengths is not None:
        longest = max(lengths, default=0)
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest image ({longest} rows)")
        max_seqlen = longest
    return lengths, max_seqlen, float(softmax_scale)


def policy_attention(q, k, v, policy, eps, softmax_scale, *, allow_float64=False):
    """Check policy_attention's arguments (q, k, v (B, N, H, d), policy (B, N)). Returns (eps, softmax_scale) as
    floats."""
    dtypes = TOKEN_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(q, "q", ndim=4, dtypes=dtypes)
    for name, t in (("k", k), ("v", v)):
        check_tensor(t, name, ndim=4, dtypes=(q.dtype,), device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1 and t.shape[3] > 1:
            raise ValueError(f"{name} must have a contiguous last dimension ({name}.stride(3) == 1)")
    B, N, H, d = q.shape
    if d not in POLICY_HEAD_DIMS:
        raise ValueError(f"q: head dim {d} is not supported; expected 16 <= d <= 128")
    check_tensor(policy, "policy", ndim=2, dtypes=(torch.float32,) + ((torch.float64,) if allow_float64 else ()),
                 device=q.device)
    if tuple(policy.shape) != (B, N):
        raise ValueError(f"policy must have shape (B, N) = {(B, N)}, got {tuple(policy.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    return float(eps), float(softmax_scale)


# --- selector_train -------------------------------------------------------------------------------

def selector_train(S, weights, num_heads, params, *, allow_float64=False):
    """Check selector_train's arguments: S (B, M, C), weights (B, M), `params` the 14 selector weights in the
    order of TOKEN_SCORES_WEIGHTS. Returns the head dim d."""
    dtypes = TOKEN_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(S, "S", ndim=3, dtypes=dtypes)
    check_int(num_heads, "num_heads", minimum=2)
    B, M, C = S.shape
    if C % num_heads != 0:
        raise ValueError(f"num_heads = {num_heads} must divide the channels C = {C} of S")
    d = C // num_heads
    if d % 4 != 0:
        raise ValueError(f"num_heads: the head dim C / num_heads = {d} must be a multiple of 4")
    wdt = (torch.float64,) if S.dtype == torch.float64 else (torch.float32,)
    check_tensor(weights, "weights", ndim=2, dtypes=wdt, device=S.device)
    if tuple(weights.shape) != (B, M):
        raise ValueError(f"weights must have shape (B, M) = {(B, M)} like S, got {tuple(weights.shape)}")
    if len(params) != len(TOKEN_SCORES_WEIGHTS):
        raise TypeError(f"selector_train takes the {len(TOKEN_SCORES_WEIGHTS)} selector weights "
                        f"{', '.join(TOKEN_SCORES_WEIGHTS)}; got {len(params)}")
    shapes = token_scores_weight_shapes(num_heads, d)
    for name, w in zip(TOKEN_SCORES_WEIGHTS, params):
        check_tensor(w, name, dtypes=tuple(dict.fromkeys((torch.float32, S.dtype))), device=S.device)
        if tuple(w.shape) != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]} for C = {C}, num_heads = {num_heads}; "
                             f"got {tuple(w.shape)}")
    return d


def selector_train_saved(S, num_heads, tensors):
    """Check the backward's extra tensors: {name: tensor} of dscore, dprob, score, prob (B, M, 2), u_loc
    (B, M, H, d/2), glob (B, H, d/2), mean, rstd (B, M, H), all in the compute dtype."""
    B, M, C = S.shape
    H = num_heads
    d2 = C // H // 2
    cdt = torch.float64 if S.dtype == torch.float64 else torch.float32
    shapes = dict(dscore=(B, M, 2), dprob=(B, M, 2), score=(B, M, 2), prob=(B, M, 2), u_loc=(B, M, H, d2),
                  glob=(B, H, d2), mean=(B, M, H), rstd=(B, M, H))
    for name, t in tensors.items():
        check_tensor(t, name, dtypes=(cdt,), device=S.device)
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]}, got {tuple(t.shape)}")


# --- add_layer_norm -------------------------------------------------------------------------------

# The Triton kernels hold a row's channels in one tile (spvit_kernels/triton/add_layer_norm.py).
ADD_LAYER_NORM_MAX_CHANNELS = 8192


def _float_dtypes(allow_float64):
    return TOKEN_DTYPES + ((torch.float64,) if allow_float64 else ())


def _branch_scale(branch_scale, rows_shape, has_branch, device, dtypes):
    """branch_scale None, or one factor per row: rows_shape (x's shape without the channels), float, on device;
    only with a branch."""
    if branch_scale is None:
        return
    if not has_branch:
        raise ValueError("branch_scale needs a branch (it scales the branch)")
    check_tensor(branch_scale, "branch_scale", dtypes=dtypes, device=device)
    if tuple(branch_scale.shape) != tuple(rows_shape):
        raise ValueError(f"branch_scale must have shape {tuple(rows_shape)} (one factor per row of x), got "
                         f"{tuple(branch_scale.shape)}")


def add_layer_norm(x, branch, weight, bias, eps, out_dtype, branch_scale=None, *, allow_float64=False):
    """Check add_layer_norm's arguments: x (..., C); branch None or x's shape; weight, bias None or (C,);
    eps a finite float >= 0; out_dtype None or a float dtype; branch_scale None or x.shape[:-1] (with a branch).
    Returns eps as a float."""
    dtypes = _float_dtypes(allow_float64)
    check_tensor(x, "x", dtypes=dtypes)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension (the channels), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C > ADD_LAYER_NORM_MAX_CHANNELS:
        raise ValueError(f"x: {C} channels; at most {ADD_LAYER_NORM_MAX_CHANNELS} are supported")
    if branch is not None:
        check_tensor(branch, "branch", dtypes=dtypes, device=x.device)
        if branch.shape != x.shape:
            raise ValueError(f"branch must have the shape of x {tuple(x.shape)}, got {tuple(branch.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t, name, ndim=1, dtypes=dtypes, device=x.device)
            if t.shape[0] != C:
                raise ValueError(f"{name} must have shape ({C},) (x's channels), got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in dtypes:
        raise TypeError(f"out_dtype must be None or one of {', '.join(str(d).replace('torch.', '') for d in dtypes)}"
                        f"; got {out_dtype}")
    _branch_scale(branch_scale, x.shape[:-1], branch is not None, x.device, dtypes)
    return float(eps)


def add_layer_norm_saved(dy, dsum, s, weight, bias, mean, rstd, x_dtype, branch_dtype, branch_scale=None, *,
                         allow_float64=False):
    """Check add_layer_norm's backward: s (..., C) the LayerNorm's input; dy, dsum None or s's shape; mean, rstd
    (rows,) in the statistics' dtype (float32; float64 for float64 s); branch_scale as the forward's."""
    add_layer_norm(s, None, weight, bias, 0.0, None, allow_float64=allow_float64)
    _branch_scale(branch_scale, s.shape[:-1], branch_dtype is not None, s.device, _float_dtypes(allow_float64))
    for name, t in (("dy", dy), ("dsum", dsum)):
        if t is not None:
            check_tensor(t, name, dtypes=_float_dtypes(allow_float64), device=s.device)
            if t.shape != s.shape:
                raise ValueError(f"{name} must have the shape of s {tuple(s.shape)}, got {tuple(t.shape)}")
    rows = s.numel() // s.shape[-1]
    stat = (torch.float64,) if s.dtype == torch.float64 else (torch.float32,)
    for name, t in (("mean", mean), ("rstd", rstd)):
        check_tensor(t, name, ndim=1, dtypes=stat, device=s.device)
        if t.shape[0] != rows:
            raise ValueError(f"{name} must have shape ({rows},) (one entry per row of s), got {tuple(t.shape)}")
    for name, dt in (("x_dtype", x_dtype), ("branch_dtype", branch_dtype)):
        if (dt is not None or name == "x_dtype") and dt not in _float_dtypes(allow_float64):
            raise TypeError(f"{name} must be a float dtype, got {dt}")


# --- gelu_mlp -------------------------------------------------------------------------------------


def gelu_mlp(h, w1, b1, w2, b2, *, allow_float64=False):
    """Check gelu_mlp's arguments: h (M, C), w1 (F, C), b1 None or (F,), w2 (C_out, F), b2 None or (C_out,),
    float, on h's device."""
    dtypes = _float_dtypes(allow_float64)
    check_tensor(h, "h", ndim=2, dtypes=dtypes)
    if h.shape[1] < 1:
        raise ValueError(f"h must have at least one channel, got shape {tuple(h.shape)}")
    check_tensor(w1, "w1", ndim=2, dtypes=dtypes, device=h.device)
    if w1.shape[1] != h.shape[1] or w1.shape[0] < 1:
        raise ValueError(f"w1 must have shape (F, {h.shape[1]}) (h's channels), got {tuple(w1.shape)}")
    check_tensor(w2, "w2", ndim=2, dtypes=dtypes, device=h.device)
    if w2.shape[1] != w1.shape[0] or w2.shape[0] < 1:
        raise ValueError(f"w2 must have shape (C_out, {w1.shape[0]}) (w1's rows), got {tuple(w2.shape)}")
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None:
            check_tensor(b, name, ndim=1, dtypes=dtypes, device=h.device)
            if b.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")


def gelu_mlp_saved(dout, h, u, g, w1, b1, w2, b2, *, allow_float64=False):
    """Check gelu_mlp's backward: dout (M, C_out); u, g (M, F) in h's dtype."""
    gelu_mlp(h, w1, b1, w2, b2, allow_float64=allow_float64)
    M = h.shape[0]
    check_tensor(dout, "dout", ndim=2, dtypes=_float_dtypes(allow_float64), device=h.device)
    if tuple(dout.shape) != (M, w2.shape[0]):
        raise ValueError(f"dout must have shape {(M, w2.shape[0])}, got {tuple(dout.shape)}")
    for name, t in (("u", u), ("g", g)):
        check_tensor(t, name, ndim=2, dtypes=(h.dtype,), device=h.device)
        if tuple(t.shape) != (M, w1.shape[0]):
            raise ValueError(f"{name} must have shape {(M, w1.shape[0])}, got {tuple(t.shape)}")
