"""prune_pack: the C++ ("cpu") and CUDA C++ ("cuda", and "cuda_simt": the same CUDA kernels executed on the
CPU by the SIMT layer, under two thread schedules each) backends against a float64 oracle.

The oracle is the reference backend run on float64 tokens (pooling in float64). Copied rows (cls, kept,
old packages) must be bitwise copies of the input rows; the new package row is compared with a per-dtype
tolerance. Scores and weights of rows that are not candidates are NaN, so a kernel that reads them shows.
GPU tests (marked gpu) run the same cases through the CUDA backend and add: candidates beyond the
shared-memory cache, more images than the fused-offset path, > 2^31 elements, CUDA-graph capture, no host
synchronisation in top-k mode, exactly one in threshold mode. The cuda_simt backend runs every case the cpu
backend runs plus the cache and fused-offset limits (on every machine, under the other two schedules).
"""

import math
import warnings

import pytest
import torch

import spvit_kernels  # noqa: F401
from spvit_kernels import ops
from spvit_kernels._ext import native
from spvit_kernels.ops import _registry

from .utils import DTYPES, make_cu_seqlens, poison_like, random_lengths, requires_gpu

NAN, INF = float("nan"), float("inf")

# (dtype, atol, rtol) of the pooled package row against the float64 oracle (output rounding dominates).
TOLERANCES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]
TOL = {dt: (atol, rtol) for dt, atol, rtol in TOLERANCES}
TOL[torch.float64] = (1e-12, 1e-12)  # the C++ kernel pools float64 in double

# (id, spatial candidates per image, num_packages, C). Images with 0 and 1 candidates, ViT-like counts, C
# that allow 16-byte vectors (64, 24 for 2-byte dtypes) and C that do not (36 half, 7), a C wider than a block.
SHAPES = [
    ("vit197", [196, 196], 0, 64),
    ("ragged_p1", [196, 0, 1, 122, 30], 1, 36),
    ("stages_p2", [121, 72, 1, 0], 2, 24),
    ("small_p3", [27, 5, 0, 1], 3, 7),
    ("one_image", [123], 1, 64),
    ("wide", [9, 0, 3], 1, 8200),
]
# num_keep 0, 1, typical, larger than every image's candidates; thresholds keeping some, all, none.
MODES = [("topk", 0), ("topk", 1), ("topk", 27), ("topk", 121), ("topk", 10**6),
         ("threshold", 0.0), ("threshold", 0.3), ("threshold", -INF), ("threshold", INF), ("threshold", NAN)]
PACKAGES = ["mean", "sum", "none"]
# Score patterns: ties, NaN, signed zeros, denormals, all equal, all NaN.
PATTERNS = ["distinct", "ties", "all_tied", "all_nan", "signed_zero", "denormal", "mixed"]


def _simt(seed):
    """The cuda_simt backend under SIMT schedule `seed` (0 in order, 1 reversed, 2 one warp ahead, 3 random)."""
    return pytest.param("cuda_simt", id=f"cuda_simt-s{seed}", marks=pytest.mark.simt_schedule(seed))


BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_gpu), _simt(1), _simt(7)]
# The GPU-only cases (cache and fused-offset limits) run on the GPU and through the SIMT layer.
CUDA_KERNELS = [pytest.param("cuda", id="cuda", marks=requires_gpu), _simt(0), _simt(2)]
# B = 5000 blocks take seconds through the SIMT layer: one schedule there.
CUDA_KERNELS_MANY_IMAGES = [pytest.param("cuda", id="cuda", marks=requires_gpu), _simt(2)]
DEVICE = {"cpu": "cpu", "cuda": "cuda", "cuda_simt": "cpu"}


def _need(backend):
    if backend not in _registry._BACKENDS["prune_pack"]:
        pytest.skip(f"the {backend!r} backend is not compiled into this build")


def _scores(T, pattern, gen):
    s = torch.randn(T, generator=gen)
    if pattern == "ties":
        s = torch.randint(-2, 3, (T,), generator=gen).float() / 2
    elif pattern == "all_tied":
        s = torch.full((T,), 0.25)
    elif pattern == "all_nan":
        s = torch.full((T,), NAN)
    elif pattern == "signed_zero":
        s = torch.tensor([0.0, -0.0, 1.0, -1.0])[torch.randint(0, 4, (T,), generator=gen)]
    elif pattern == "denormal":
        s = torch.tensor([1e-40, -1e-40, 0.0, 2e-45])[torch.randint(0, 4, (T,), generator=gen)]
    elif pattern == "mixed":  # quantised (ties), NaN, +-inf, +-0 in one image
        s = torch.round(s * 4) / 4
        r = torch.rand(T, generator=gen)
        s[r < 0.1] = NAN
        s[(r >= 0.1) & (r < 0.13)] = INF
        s[(r >= 0.13) & (r < 0.16)] = -INF
        s[(r >= 0.16) & (r < 0.2)] = -0.0
    return s


def make_batch(spatial, num_packages, C, dtype, pattern="mixed", device="cpu", seed=0, num_prefix=1):
    """A ragged batch of images [num_prefix prefix rows, spatial, packages]: x (T, C), cu_seqlens, keep_score,
    keep_prob. Non-candidate rows get NaN scores/weights."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [num_prefix + n + num_packages for n in spatial]
    cu = make_cu_seqlens(lengths)
    T = int(cu[-1])
    x = torch.randn(T, C, generator=gen).to(dtype)
    score = _scores(T, pattern, gen)
    prob = torch.rand(T, generator=gen)
    candidate = torch.zeros(T, dtype=torch.bool)
    for b, n in enumerate(spatial):
        start = int(cu[b]) + num_prefix
        candidate[start:start + n] = True
    score[~candidate] = NAN  # cls and package rows: never read
    prob[~candidate] = NAN
    return x.to(device), cu.to(device), score.to(device), prob.to(device)


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def check_against_oracle(out, x, cu, score, prob, num_packages, mode, threshold, num_keep, package):
    """out = (x_out, cu_out, src_index) of a fast backend; the oracle is the reference on float64."""
    x_out, cu_out, src = out
    ref_x, ref_cu, ref_src = ops.prune_pack(x.double().cpu(), cu.cpu(), score.cpu(), prob.cpu(), num_packages, mode,
                                            threshold, num_keep, package, backend="reference")
    assert x_out.dtype == x.dtype and x_out.device == x.device and x_out.shape == (ref_x.shape[0], x.shape[1])
    assert cu_out.dtype == torch.int32 and src.dtype == torch.int64
    assert torch.equal(cu_out.cpu(), ref_cu.to(torch.int32)), (cu_out, ref_cu)
    assert torch.equal(src.cpu(), ref_src), "src_index differs from the oracle"
    x_out, src, xc = x_out.cpu(), src.cpu(), x.cpu()
    copied = src >= 0
    # Copied rows are exact: compare bit patterns (NaN, -0 included).
    assert torch.equal(_bits(x_out[copied]), _bits(xc[src[copied]])), "copied rows are not bitwise copies"
    pooled = ~copied
    atol, rtol = TOL[x.dtype]
    got, want = x_out[pooled].double(), ref_x[pooled]
    if x.dtype == torch.float32 and package == "sum" and pooled.any():
        # An fp32 sum over thousands of dropped rows: its rounding error grows with the row's magnitude
        # (sum of |w_i x_i|), not with the possibly cancelling result, and kernels add in different orders.
        magnitude = ops.prune_pack(xc.double().abs(), cu.cpu(), score.cpu(), prob.cpu().abs(), num_packages, mode,
                                   threshold, num_keep, "sum", backend="reference")[0][pooled]
        bound = atol + rtol * want.abs() + 4 * 2.0**-24 * magnitude
        assert not torch.isnan(got).any() and bool(((got - want).abs() <= bound).all()), \
            f"package rows differ: max error {float((got - want).abs().max())}"
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def _poison_cache(device, nbytes):
    """Fill the CUDA caching allocator with NaN so rows a kernel forgets to write show up as NaN."""
    if torch.device(device).type == "cuda":
        junk = torch.full((nbytes // 4 + 1024,), NAN, device=device)
        del junk


def run_backend(backend, x, cu, score, prob, num_packages, mode, threshold, num_keep, package):
    _poison_cache(x.device, 4 * x.numel() * x.element_size())
    kw = dict(threshold=threshold, num_keep=num_keep if mode == "topk" else None, package=package)
    return ops.prune_pack(x, cu, score, prob, num_packages, mode, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("mode,arg", MODES, ids=[f"{m}-{a}" for m, a in MODES])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(backend, dtype, shape, mode, arg, package):
    _need(backend)
    _, spatial, P, C = shape
    batch = make_batch(spatial, P, C, dtype, "mixed", DEVICE[backend])
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    out = run_backend(backend, *batch, P, mode, threshold, num_keep, package)
    check_against_oracle(out, *batch, P, mode, threshold, num_keep, package)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,arg", [("topk", 1), ("topk", 50), ("topk", 196), ("threshold", 0.0),
                                      ("threshold", -0.0), ("threshold", 1e-45)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_score_patterns(backend, pattern, mode, arg):
    _need(backend)
    batch = make_batch([196, 100, 3, 0], 1, 32, torch.float32, pattern, DEVICE[backend], seed=1)
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    out = run_backend(backend, *batch, 1, mode, threshold, num_keep, "mean")
    check_against_oracle(out, *batch, 1, mode, threshold, num_keep, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,arg", [("topk", 0), ("topk", 13), ("threshold", 0.2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_257_images(backend, dtype, mode, arg):
    _need(backend)
    gen = torch.Generator().manual_seed(3)
    spatial = random_lengths(257, 0, 40, generator=gen)
    spatial[:3] = [0, 1, 40]
    batch = make_batch(spatial, 2, 48, dtype, "mixed", DEVICE[backend], seed=4)
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    out = run_backend(backend, *batch, 2, mode, threshold, num_keep, "mean")
    check_against_oracle(out, *batch, 2, mode, threshold, num_keep, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_compares_in_float32(backend):
    """Like torch's `scores > 0.1`: the threshold is rounded to float32 first, so float32(0.1) is not kept."""
    _need(backend)
    x, cu, score, prob = make_batch([4], 0, 8, torch.float32, "distinct", DEVICE[backend])
    score[1:] = torch.tensor([0.1, 0.2, 0.05, 0.1000001], dtype=torch.float32)
    out = ops.prune_pack(x, cu, score, prob, 0, "threshold", threshold=0.1, backend=backend)
    assert out[2].tolist() == [0, 2, 4, -1]
    check_against_oracle(out, x, cu, score, prob, 0, "threshold", 0.1, None, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_rows_are_bitwise_copies_with_special_values(backend, dtype):
    _need(backend)
    x, cu, score, prob = make_batch([50, 7], 1, 40, dtype, "distinct", DEVICE[backend])
    x[::3, ::5] = NAN
    x[1::3, ::7] = -0.0
    x[2::3, 1::7] = INF
    out = ops.prune_pack(x, cu, score, prob, 1, "topk", num_keep=20, package="none", backend=backend)
    check_against_oracle(out, x, cu, score, prob, 1, "topk", 0.0, 20, "none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned_rows(backend, dtype):
    """Rows with a stride other than C, and a base pointer off 16 bytes (the scalar fallback on CUDA)."""
    _need(backend)
    x, cu, score, prob = make_batch([60, 3], 1, 72, dtype, "mixed", DEVICE[backend])
    wide = torch.randn(x.shape[0], 81, device=x.device).to(dtype)
    for view in (wide[:, :72], wide[:, 1:73], wide.view(-1)[1:1 + x.numel()].view_as(x)):
        view.copy_(x)
        for mode, threshold, num_keep in (("topk", 0.0, 25), ("threshold", 0.0, None)):
            out = ops.prune_pack(view, cu, score, prob, 1, mode, threshold, num_keep, "mean", backend=backend)
            check_against_oracle(out, x, cu, score, prob, 1, mode, threshold, num_keep, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_give_zero_mean(backend):
    _need(backend)
    x, cu, score, prob = make_batch([30, 30], 0, 16, torch.float32, "distinct", DEVICE[backend])
    prob[1:31] = 0.0  # image 0: every dropped row has weight 0
    for package in ("mean", "sum"):
        out = ops.prune_pack(x, cu, score, prob, 0, "topk", num_keep=10, package=package, backend=backend)
        assert torch.equal(out[0][11].cpu(), torch.zeros(16))
        check_against_oracle(out, x, cu, score, prob, 0, "topk", 0.0, 10, package)


@pytest.mark.parametrize("backend", BACKENDS[:2])  # the dispatcher runs the cpu kernel on CPU tensors
def test_dispatcher_entry_point_matches(backend):
    """torch.ops.spvit.prune_pack (no host read of cu_seqlens) gives the same result as the Python function."""
    _need(backend)
    batch = make_batch([196, 196, 196], 1, 32, torch.bfloat16, "mixed", DEVICE[backend])
    for mode, threshold, num_keep in (("topk", 0.0, 121), ("threshold", 0.0, None)):
        a = torch.ops.spvit.prune_pack(*batch, 1, mode, threshold, num_keep, "mean")
        check_against_oracle(a, *batch, 1, mode, threshold, num_keep, "mean")


# --- the native entry points themselves ----------------------------------------------------------------

def _native_for(backend):
    _need(backend)
    return native(f"prune_pack_{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_rejects_bad_arguments_by_name(backend):
    fn = _native_for(backend)
    x, cu, s, p = make_batch([5, 5], 1, 8, torch.float32, device=DEVICE[backend])
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        fn(x, cu.long(), s, p, 1, 1, 0.0, 2, 2, -1)
    with pytest.raises(RuntimeError, match="keep_score"):
        fn(x, cu, s.half(), p, 1, 1, 0.0, 2, 2, -1)
    with pytest.raises(RuntimeError, match="keep_prob"):
        fn(x, cu, s, p[:-1], 1, 1, 0.0, 2, 2, -1)
    with pytest.raises(RuntimeError, match="mode"):
        fn(x, cu, s, p, 1, 7, 0.0, 2, 2, -1)
    with pytest.raises(RuntimeError, match="num_keep"):
        fn(x, cu, s, p, 1, 1, 0.0, -1, 2, -1)
    with pytest.raises(RuntimeError, match="package"):
        fn(x, cu, s, p, 1, 1, 0.0, 2, 5, -1)


BAD_SEQLENS = [[0, 9, 4, 16], [0, 40, 50, 60], [0, -5, 3, 16], [0, 16, 16, 16], [3, 3, 1, 2], [0, 0, 0, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_topk_assumed_size_pads_with_zero_rows(backend):
    """total_rows assumed B*(extra+num_keep) but an image has fewer candidates: the tail is zeros, src -1."""
    fn = _native_for(backend)
    x, cu, s, p = make_batch([10, 2, 10], 1, 16, torch.float16, "distinct", DEVICE[backend])
    k, B = 5, 3
    assumed = B * (1 + 1 + 1 + k)
    x_out, cu_out, src = fn(x, cu, s, p, 1, 1, 0.0, k, 2, assumed)
    ref_x, ref_cu, ref_src = ops.prune_pack(x, cu, s, p, 1, "topk", num_keep=k, backend="reference")
    real = int(ref_cu[-1])  # the reference pads to the same fixed size
    assert real == assumed - 3 and x_out.shape[0] == assumed and ref_x.shape[0] == assumed
    x_out, cu_out, src, ref_x, ref_src = x_out.cpu(), cu_out.cpu(), src.cpu(), ref_x.cpu(), ref_src.cpu()
    assert torch.equal(cu_out, ref_cu.cpu().to(torch.int32))
    assert torch.equal(src, ref_src) and bool((src[real:] == -1).all())
    assert torch.equal(x_out[real:], torch.zeros(3, 16, dtype=torch.float16))
    assert torch.equal(_bits(x_out[src >= 0]), _bits(ref_x[ref_src >= 0]))


def test_native_cpu_float64():
    fn = _native_for("cpu")
    x, cu, s, p = make_batch([196, 0, 40], 1, 24, torch.float64, "mixed")
    for mode, thr, k in ((1, 0.0, 50), (0, 0.25, -1)):
        out = fn(x, cu, s, p, 1, mode, thr, k, 2, -1)
        check_against_oracle(out, x, cu, s, p, 1, ("threshold", "topk")[mode], thr, None if k < 0 else k, "mean")


# --- bad input through the public function (shared validation) ------------------------------------------

def _bad_input_cases():
    x, cu, s, p = make_batch([5, 5], 1, 8, torch.float32, "distinct")
    T = x.shape[0]
    good = dict(x=x, cu_seqlens=cu, keep_score=s, keep_prob=p, num_packages=1, mode="topk", num_keep=2)
    cases = [
        ("cu_seqlens", ValueError, dict(cu_seqlens=torch.tensor([0, 10, 7, T], dtype=torch.int32))),
        ("cu_seqlens", ValueError, dict(cu_seqlens=torch.tensor([0, 7, T - 1], dtype=torch.int32))),
        ("cu_seqlens", TypeError, dict(cu_seqlens=cu.long())),
        ("x", TypeError, dict(x=x.int())),
        ("keep_score", TypeError, dict(keep_score=s.double())),
        ("keep_prob", ValueError, dict(keep_prob=p[:-1])),
        ("num_packages", ValueError, dict(num_packages=7)),
        ("mode", ValueError, dict(mode="median")),
        ("num_keep", ValueError, dict(num_keep=-1)),
        ("package", ValueError, dict(package="max")),
    ]
    return good, cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(10))
def test_bad_input_raises_with_argument_name(backend, case):
    _expect_error_naming_argument(backend, *_bad_input_cases(), case)


def _expect_error_naming_argument(backend, good, cases, case):
    """Run prune_pack with `good` changed by cases[case] = (name, exception, change): it raises, naming `name`."""
    _need(backend)
    name, exc, change = cases[case]
    kwargs = {k: (v.to(DEVICE.get(backend, "cpu")) if isinstance(v, torch.Tensor) else v)
              for k, v in {**good, **change}.items()}
    with pytest.raises(exc, match=name):
        ops.prune_pack(**kwargs, backend=backend)


# --- opcheck (schema, fake implementation, autograd registration) ----------------------------------------

def test_opcheck_topk():
    _need("cpu")
    # The fake implementation sizes top-k output as B * (1 + P + 1 + num_keep) (no host read of cu_seqlens), so
    # every image here has at least num_keep candidates, as in every SPViT model.
    x, cu, s, p = make_batch([196, 30, 27], 1, 16, torch.float32, "mixed")
    torch.library.opcheck(torch.ops.spvit.prune_pack.default, (x, cu, s, p, 1, "topk", 0.0, 27, "mean"))


def test_opcheck_threshold():
    _need("cpu")
    # Data-dependent output size: the fake implementation returns an unbacked symbolic row count. All of
    # opcheck's checks (aot_dispatch_dynamic included) pass with it.
    x, cu, s, p = make_batch([196, 30, 0], 1, 16, torch.float32, "mixed")
    torch.library.opcheck(torch.ops.spvit.prune_pack.default, (x, cu, s, p, 1, "threshold", 0.0, None, "sum"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,arg", [("topk", 50), ("threshold", 0.0)])
def test_torch_compile_fullgraph(backend, mode, arg):
    """The op traces into one graph (fake implementation; threshold mode with an unbacked output size)."""
    _need(backend)
    batch = make_batch([196, 196], 1, 32, torch.float32, "mixed", DEVICE[backend])
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    fn = torch.compile(lambda x, cu, s, p: ops.prune_pack(x, cu, s, p, 1, mode, threshold, num_keep, "mean"),
                       backend="aot_eager", fullgraph=True)
    check_against_oracle(fn(*batch), *batch, 1, mode, threshold, num_keep, "mean")


# --- prefix rows (num_prefix) and the 1x package mode (package_merge="add"), on every backend -------------

PREFIXES = [0, 1, 2, 5]  # class-free, cls, cls + distillation, cls + 4 registers
# (package_merge, num_packages, package): "add" takes 0 (its first stage appends) or 1 old package rows.
MERGES = [("concat", 0, "mean"), ("concat", 2, "none"), ("concat", 2, "sum"), ("add", 0, "mean"),
          ("add", 1, "mean"), ("add", 1, "sum")]
MERGE_MODES = [("topk", 1), ("topk", 27), ("topk", 10**6), ("threshold", 0.0)]
ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


def oracle_prune_pack(x, cu, score, prob, num_packages, mode, threshold, num_keep, package, package_merge,
                      num_prefix):
    """An independent float64 prune_pack, row by row in plain Python (design sections 2 and 4).

    Returns (rows, cu_out, src): rows (T_out, C) float64 where copied rows are x's values and new (or merged)
    package rows are computed here; cu_out and src as lists."""
    xd, sc, pr = x.double().cpu(), score.cpu().tolist(), prob.cpu().tolist()
    thr32 = torch.tensor(threshold, dtype=torch.float32).item()  # the comparison is made in float32
    bounds = cu.cpu().tolist()
    rows, src, cu_out = [], [], [0]
    for s, e in zip(bounds[:-1], bounds[1:]):
        first, pkg = s + num_prefix, e - num_packages
        cand = list(range(first, pkg))
        if mode == "threshold":
            keep = {i for i in cand if sc[i] > thr32}  # NaN compares False
        else:  # higher first, NaN last, ties to the lower index
            order = sorted(cand, key=lambda i: (1, 0.0, i) if math.isnan(sc[i]) else (0, -sc[i], i))
            keep = set(order[:num_keep])
        merge = package_merge == "add" and num_packages > 0
        image_src = list(range(s, first)) + [i for i in cand if i in keep]
        if not merge:
            image_src += list(range(pkg, e))
        rows += [xd[i] for i in image_src]
        if package != "none":
            dropped = [i for i in cand if i not in keep]
            total, wsum = torch.zeros(x.shape[1], dtype=torch.float64), 0.0
            for i in dropped:
                total = total + pr[i] * xd[i]
                wsum += pr[i]
            if package == "mean":
                total = total / wsum if (dropped and wsum != 0) else torch.zeros_like(total)
            if merge:
                total = total + xd[pkg]
            rows.append(total)
            image_src.append(-1)
        src += image_src
        cu_out.append(cu_out[-1] + len(image_src))
    if mode == "topk":
        # Top-k's output size is fixed by the shapes (design section 4): the most candidates one image can have
        # bounds k, and the rows no image owns are zeros with src -1.
        B = len(bounds) - 1
        k = min(num_keep, max(x.shape[0] - B * (num_prefix + num_packages), 0))
        package_rows = 1 if package_merge == "add" else num_packages + (package != "none")
        pad = B * (num_prefix + package_rows + k) - len(src)
        rows += [torch.zeros(x.shape[1], dtype=torch.float64)] * pad
        src += [-1] * pad
    out = torch.stack(rows) if rows else torch.zeros(0, x.shape[1], dtype=torch.float64)
    return out, cu_out, src


def check_against_independent_oracle(out, x, cu, score, prob, num_packages, mode, threshold, num_keep, package,
                                     package_merge, num_prefix):
    x_out, cu_out, src = (t.cpu() for t in out)
    ref_rows, ref_cu, ref_src = oracle_prune_pack(x, cu, score, prob, num_packages, mode, threshold, num_keep,
                                                  package, package_merge, num_prefix)
    assert x_out.dtype == x.dtype and x_out.shape == (len(ref_src), x.shape[1])
    assert cu_out.dtype == torch.int32 and cu_out.tolist() == ref_cu
    assert src.dtype == torch.int64 and src.tolist() == ref_src
    copied = src >= 0
    assert torch.equal(_bits(x_out[copied]), _bits(x.cpu()[src[copied]])), "copied rows are not bitwise copies"
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(x_out[~copied].double(), ref_rows[~copied], atol=atol, rtol=rtol)
    # Package rows per image: one in "add" mode, else the old ones plus the new one.
    per_image = 1 if package_merge == "add" else num_packages + (package != "none")
    for b in range(len(ref_cu) - 1):
        tail = src[ref_cu[b + 1] - per_image:ref_cu[b + 1]]
        assert (tail < 0).sum() == (package != "none")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("merge,P,package", MERGES, ids=[f"{m}-P{p}-{k}" for m, p, k in MERGES])
@pytest.mark.parametrize("mode,arg", MERGE_MODES, ids=[f"{m}-{a}" for m, a in MERGE_MODES])
@pytest.mark.parametrize("num_prefix", PREFIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_and_merge_match_independent_oracle(backend, dtype, num_prefix, mode, arg, merge, P, package):
    _need(backend)
    batch = make_batch([196, 0, 1, 122, 30], P, 40, dtype, "mixed", DEVICE.get(backend, "cpu"), seed=num_prefix,
                       num_prefix=num_prefix)
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    _poison_cache(batch[0].device, 4 * batch[0].numel() * batch[0].element_size())
    out = ops.prune_pack(*batch, P, mode, threshold, num_keep, package, package_merge=merge, num_prefix=num_prefix,
                         backend=backend)
    check_against_independent_oracle(out, *batch, P, mode, threshold, num_keep, package, merge, num_prefix)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("C", [7, 64])
@pytest.mark.parametrize("merge,P,package", [("add", 1, "mean"), ("concat", 1, "sum")])
def test_prefix_and_merge_one_image(backend, C, merge, P, package):
    """B = 1, ViT-like sizes (197 = 5 + 192 rows), C without and with 16-byte vectors."""
    _need(backend)
    batch = make_batch([192 - P], P, C, torch.bfloat16, "mixed", DEVICE.get(backend, "cpu"), num_prefix=5)
    for mode, threshold, num_keep in (("topk", 0.0, 121), ("threshold", 0.0, None)):
        out = ops.prune_pack(*batch, P, mode, threshold, num_keep, package, package_merge=merge, num_prefix=5,
                             backend=backend)
        check_against_independent_oracle(out, *batch, P, mode, threshold, num_keep, package, merge, 5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_add_mode_worked_example(backend):
    """One image [cls, dist, a, b, c, package], keep the best candidate (b): the dropped rows' pooled row is
    added to the package row, which stays the image's only package row (src_index -1). Exact in float32."""
    _need(backend)
    dev = DEVICE.get(backend, "cpu")
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [0.5, -0.5]], device=dev)
    cu = torch.tensor([0, 6], dtype=torch.int32, device=dev)
    score = torch.tensor([NAN, NAN, 0.1, 0.9, -0.3, NAN], device=dev)
    prob = torch.tensor([NAN, NAN, 0.5, 0.25, 1.5, NAN], device=dev)
    # sum: 0.5 * (10, 20) + 1.5 * (50, 60) = (80, 100); mean: that / 2 = (40, 50); plus (0.5, -0.5).
    for package, merged in (("sum", [80.5, 99.5]), ("mean", [40.5, 49.5])):
        x_out, cu_out, src = ops.prune_pack(x, cu, score, prob, 1, "topk", num_keep=1, package=package,
                                            package_merge="add", num_prefix=2, backend=backend)
        assert src.tolist() == [0, 1, 3, -1] and cu_out.tolist() == [0, 4]
        assert x_out.tolist() == [[1.0, 2.0], [3.0, 4.0], [30.0, 40.0], merged]
    # The first stage (no package row yet) appends the pooled row.
    x_out, cu_out, src = ops.prune_pack(x[:5], torch.tensor([0, 5], dtype=torch.int32, device=dev), score[:5],
                                        prob[:5], 0, "topk", num_keep=1, package="mean", package_merge="add",
                                        num_prefix=2, backend=backend)
    assert src.tolist() == [0, 1, 3, -1] and x_out[3].tolist() == [40.0, 50.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatcher_entry_point_with_prefix_and_merge(backend):
    """torch.ops.spvit.prune_pack with the new arguments positional (no host read of cu_seqlens)."""
    _need(backend)
    batch = make_batch([196, 196, 196], 1, 32, torch.bfloat16, "mixed", DEVICE[backend], num_prefix=2)
    for mode, threshold, num_keep in (("topk", 0.0, 121), ("threshold", 0.0, None)):
        a = torch.ops.spvit.prune_pack(*batch, 1, mode, threshold, num_keep, "mean", "add", 2)
        check_against_independent_oracle(a, *batch, 1, mode, threshold, num_keep, "mean", "add", 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_rejects_bad_prefix_and_merge(backend):
    fn = _native_for(backend)
    x, cu, s, p = make_batch([5, 5], 1, 8, torch.float32, device=DEVICE[backend])
    with pytest.raises(RuntimeError, match="num_prefix"):
        fn(x, cu, s, p, 1, 1, 0.0, 2, 2, -1, 0, -1)
    with pytest.raises(RuntimeError, match="package_merge"):
        fn(x, cu, s, p, 1, 1, 0.0, 2, 2, -1, 2, 1)
    with pytest.raises(RuntimeError, match="package_merge"):
        fn(x, cu, s, p, 1, 1, 0.0, 2, 0, -1, 1, 1)  # add without a package
    with pytest.raises(RuntimeError, match="package_merge"):
        fn(x, cu, s, p, 2, 1, 0.0, 2, 2, -1, 1, 1)  # add with two old package rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bounds", BAD_SEQLENS, ids=str)
@pytest.mark.parametrize("P,merge,num_prefix", [(2, 0, 1), (1, 0, 0), (1, 1, 5), (1, 1, 100)])
def test_native_unchecked_bad_seqlens_stay_in_bounds(backend, bounds, P, merge, num_prefix):
    """Unvalidated cu_seqlens (as under CUDA-graph capture): any numbers, but no crash or out-of-bounds write,
    also with prefix rows (more than an image has, too) and the add-mode package row."""
    fn = _native_for(backend)
    dev = DEVICE[backend]
    T, k = 16, 3
    x = torch.randn(T, 24, device=dev)
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    s, p = torch.randn(T, device=dev), torch.rand(T, device=dev)
    B = len(bounds) - 1
    for mode, total in ((0, -1), (1, -1), (1, 5), (1, B * (num_prefix + P + 1 + k))):
        x_out, cu_out, src = fn(x, cu, s, p, P, mode, 0.0, k, 2, total, merge, num_prefix)
        if dev == "cuda":
            torch.cuda.synchronize()
        rows = x_out.shape[0]
        assert total < 0 or rows == total
        assert src.shape == (rows,) and cu_out.shape == (B + 1,)
        assert int(cu_out.min()) >= 0 and int(cu_out.max()) <= rows
        assert bool(((src >= -1) & (src < T)).all())
        assert not torch.isnan(x_out).any()


def _bad_prefix_merge_cases():
    x, cu, s, p = make_batch([5, 5], 1, 8, torch.float32, "distinct")  # two images of 7 rows
    good = dict(x=x, cu_seqlens=cu, keep_score=s, keep_prob=p, num_packages=1, mode="topk", num_keep=2)
    return good, [
        ("num_prefix", ValueError, dict(num_prefix=-1)),
        ("num_prefix", ValueError, dict(num_prefix=8)),  # larger than an image
        ("num_prefix", TypeError, dict(num_prefix="2")),
        ("num_packages", ValueError, dict(num_prefix=7)),  # 7 prefix + 1 package rows > 7
        ("package_merge", ValueError, dict(package_merge="max")),
        ("package_merge", ValueError, dict(package_merge="add", package="none")),
        ("package_merge", ValueError, dict(package_merge="add", num_packages=2)),
    ]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", range(7))
def test_bad_prefix_and_merge_raise_with_argument_name(backend, case):
    _expect_error_naming_argument(backend, *_bad_prefix_merge_cases(), case)


def test_opcheck_prefix_and_merge():
    _need("cpu")
    x, cu, s, p = make_batch([196, 30, 27], 1, 16, torch.float32, "mixed", num_prefix=2)
    torch.library.opcheck(torch.ops.spvit.prune_pack.default, (x, cu, s, p, 1, "topk", 0.0, 27, "mean", "add", 2))
    x, cu, s, p = make_batch([196, 30, 0], 0, 16, torch.float32, "mixed", num_prefix=0)
    torch.library.opcheck(torch.ops.spvit.prune_pack.default,
                          (x, cu, s, p, 0, "threshold", 0.0, None, "sum", "concat", 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,arg", [("topk", 50), ("threshold", 0.0)])
@pytest.mark.parametrize("merge,P,num_prefix", [("add", 1, 2), ("add", 0, 0), ("concat", 2, 5)])
def test_torch_compile_fullgraph_prefix_and_merge(backend, mode, arg, merge, P, num_prefix):
    _need(backend)
    batch = make_batch([196, 196], P, 32, torch.float32, "mixed", DEVICE[backend], num_prefix=num_prefix)
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    fn = torch.compile(lambda x, cu, s, p: ops.prune_pack(x, cu, s, p, P, mode, threshold, num_keep, "mean",
                                                          package_merge=merge, num_prefix=num_prefix),
                       backend="aot_eager", fullgraph=True)
    check_against_independent_oracle(fn(*batch), *batch, P, mode, threshold, num_keep, "mean", merge, num_prefix)


# --- GPU only ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CUDA_KERNELS)
@pytest.mark.parametrize("n", [4096, 4097, 9000])
@pytest.mark.parametrize("pattern", ["mixed", "ties", "all_tied"])
@pytest.mark.parametrize("mode,arg", [("topk", 1), ("topk", 2500), ("threshold", 0.0)])
def test_cuda_many_candidates(backend, n, pattern, mode, arg):
    """Images at and past the shared-memory key cache (4096 candidates): the global-memory path."""
    _need(backend)
    batch = make_batch([n, 5, n // 2], 1, 40, torch.bfloat16, pattern, DEVICE[backend], seed=n)
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    out = run_backend(backend, *batch, 1, mode, threshold, num_keep, "mean")
    check_against_oracle(out, *batch, 1, mode, threshold, num_keep, "mean")


@pytest.mark.parametrize("backend", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_sum_over_many_dropped_rows(backend, dtype):
    """package="sum" over ~4,500 dropped rows: fp32 tolerances scale with the row's magnitude."""
    _need(backend)
    batch = make_batch([4600, 7], 1, 24, dtype, "mixed", DEVICE[backend], seed=11)
    out = run_backend(backend, *batch, 1, "topk", 0.0, 100, "sum")
    check_against_oracle(out, *batch, 1, "topk", 0.0, 100, "sum")


@pytest.mark.parametrize("backend", CUDA_KERNELS_MANY_IMAGES)
@pytest.mark.parametrize("mode,arg", [("topk", 3), ("threshold", 0.0)])
def test_cuda_more_images_than_fused_offsets(backend, mode, arg):
    """B = 5000 > 4096: top-k offsets come from the separate prefix-sum kernel."""
    _need(backend)
    gen = torch.Generator().manual_seed(5)
    spatial = random_lengths(5000, 0, 9, generator=gen)
    batch = make_batch(spatial, 1, 16, torch.float16, "mixed", DEVICE[backend], seed=6)
    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
    out = run_backend(backend, *batch, 1, mode, threshold, num_keep, "sum")
    check_against_oracle(out, *batch, 1, mode, threshold, num_keep, "sum")


@pytest.mark.parametrize("backend", CUDA_KERNELS_MANY_IMAGES)
@pytest.mark.parametrize("B", [7, 5000])
def test_cuda_topk_without_total_rows(backend, B):
    """A direct call with total_rows = -1 in top-k mode sizes the output itself."""
    fn = _native_for(backend)
    gen = torch.Generator().manual_seed(B)
    spatial = random_lengths(B, 0, 30, generator=gen)
    x, cu, s, p = make_batch(spatial, 2, 32, torch.float32, "mixed", DEVICE[backend])
    out = fn(x, cu, s, p, 2, 1, 0.0, 11, 2, -1)
    check_against_oracle(out, x, cu, s, p, 2, "topk", 0.0, 11, "mean")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_on_a_side_stream(dtype):
    _need("cuda")
    batch = make_batch([196, 121, 0], 1, 64, dtype, "mixed", "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.prune_pack(*batch, 1, "topk", num_keep=60, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    check_against_oracle(out, *batch, 1, "topk", 0.0, 60, "mean")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_topk_does_not_synchronize(dtype):
    _need("cuda")
    B, P, k = 6, 1, 50
    batch = make_batch([196] * B, P, 64, dtype, "mixed", "cuda")
    total_rows = B * (1 + P + 1 + k)  # pre-read: every image has >= k candidates
    cuda_backend = _registry.resolve("prune_pack", "cuda", "cuda").fn
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        direct = cuda_backend(*batch, P, "topk", 0.0, k, "mean", total_rows)
        with ops.unchecked_seqlens():
            public = ops.prune_pack(*batch, P, "topk", num_keep=k)
        dispatched = torch.ops.spvit.prune_pack(*batch, P, "topk", 0.0, k, "mean")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for out in (direct, public, dispatched):
        check_against_oracle(out, *batch, P, "topk", 0.0, k, "mean")


@requires_gpu
def test_cuda_threshold_synchronizes_once():
    _need("cuda")
    batch = make_batch([196, 50, 0], 1, 64, torch.bfloat16, "mixed", "cuda")
    cuda_backend = _registry.resolve("prune_pack", "cuda", "cuda").fn
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = cuda_backend(*batch, 1, "threshold", 0.0, None, "mean", None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    check_against_oracle(out, *batch, 1, "threshold", 0.0, None, "mean")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_graph_capture_topk(dtype):
    """Top-k captured in a CUDA graph (cu_seqlens are not read during capture), replayed on new scores."""
    _need("cuda")
    B, P, k = 5, 2, 40
    x, cu, s, p = make_batch([121] * B, P, 96, dtype, "mixed", "cuda")
    static = [x.clone(), cu.clone(), s.clone(), p.clone()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph
        ops.prune_pack(*static, P, "topk", num_keep=k, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.prune_pack(*static, P, "topk", num_keep=k, backend="cuda")
    for seed in (10, 11):
        nx, _, ns, npb = make_batch([121] * B, P, 96, dtype, "mixed", "cuda", seed=seed)
        static[0].copy_(nx)
        static[2].copy_(ns)
        static[3].copy_(npb)
        graph.replay()
        torch.cuda.synchronize()
        check_against_oracle(tuple(t.clone() for t in captured), nx, cu, ns, npb, P, "topk", 0.0, k, "mean")
        eager = ops.prune_pack(nx, cu, ns, npb, P, "topk", num_keep=k, backend="cuda")
        for a, b in zip(captured, eager):
            assert torch.equal(_bits(a) if a.is_floating_point() else a, _bits(b) if b.is_floating_point() else b)


@requires_gpu
@pytest.mark.slow
def test_cuda_more_than_2_31_elements():
    """T * C > 2^31: element offsets must be 64-bit. Checks the last image, whose rows lie past 2^31."""
    _need("cuda")
    C, dtype = 1024, torch.bfloat16
    T = (2**31) // C + 4096
    need = 3 * T * C * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    # Two images: one huge (2 candidates short of all rows), one small at the end, past element 2^31.
    small = 300
    big = T - (1 + small + 1) - 2
    spatial = [big, small]
    lengths = [1 + n + 1 for n in spatial]
    assert sum(lengths) == T
    cu = make_cu_seqlens(lengths, "cuda")
    x = torch.empty(T, C, device="cuda", dtype=dtype).uniform_(-1, 1)  # in place: no float32 temporary
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(T, device="cuda", generator=gen)
    p = torch.rand(T, device="cuda", generator=gen)
    k = 100
    out_x, out_cu, src = ops.prune_pack(x, cu, s, p, 1, "topk", num_keep=k, backend="cuda")
    assert out_x.shape[0] == 2 * (1 + k + 1 + 1)
    # Check the small (second) image exactly against the reference on its own rows.
    start = int(cu[1])
    sub = slice(start, T)
    ref_x, _, ref_src = ops.prune_pack(x[sub].double(), make_cu_seqlens([T - start], "cuda"), s[sub], p[sub], 1,
                                       "topk", num_keep=k, backend="reference")
    mine = slice(int(out_cu[1]), int(out_cu[2]))
    assert torch.equal(src[mine], ref_src + start * (ref_src >= 0))
    copied = src[mine] >= 0
    assert torch.equal(_bits(out_x[mine][copied]), _bits(x[src[mine][copied]]))
    torch.testing.assert_close(out_x[mine][~copied].double(), ref_x[~copied], atol=1.6e-2, rtol=1.6e-2)
    # And the first image's selection against torch.topk-free reference ordering on its scores.
    ref_first = ops.prune_pack(x[:start][:, :8].contiguous(), make_cu_seqlens([start], "cuda"), s[:start], p[:start],
                               1, "topk", num_keep=k, package="none", backend="reference")[2]
    assert torch.equal(src[:1 + k + 1], ref_first)
    assert math.isfinite(float(out_x.float().abs().max()))
