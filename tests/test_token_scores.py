"""token_scores: the C++ ("cpu") and Triton ("triton") backends against a float64 oracle.

The oracle is the reference backend run on float64 copies of the same (already rounded) tokens and weights.
The C++ kernel computes in float32 from any token dtype, so it is held to float32 tolerances for every dtype;
the Triton kernel feeds its tensor-core matmuls in the tokens' dtype, so it gets a per-dtype table. Rows of
cls and package tokens must be exactly +inf / 1, and no NaN may appear anywhere.

Triton runs under TRITON_INTERPRET=1 on CPU here (small shapes: the interpreter runs every program in numpy);
the GPU tests (marked gpu) run the full matrix on CUDA, plus 257 images, bitwise determinism, outputs over
recycled NaN-filled memory, torch.compile, no host synchronisation, CUDA-graph capture and row offsets past
2^31 elements.
"""

import pytest
import torch

import spvit_kernels  # noqa: F401
from spvit_kernels import ops
from spvit_kernels._ext import native
from spvit_kernels.ops import _registry, _validate

from .utils import DTYPES, make_cu_seqlens, random_lengths, requires_gpu, requires_triton_interpret

INF = float("inf")

# The five model widths (C, H): DeiT-T/S/B and the 256 / 320-channel DeiTs (all d = 64; H // 2 = 1 for H = 3).
WIDTHS = [(192, 3), (384, 6), (768, 12), (256, 4), (320, 5)]
# Small widths with a head dim that is not a power of two or is below the 16-wide tl.dot tiles.
SMALL_WIDTHS = [(32, 2), (72, 3), (40, 2)]

# (dtype, atol, rtol of keep_score, atol of keep_prob) against the float64 oracle. keep_prob lies in [0, 1]
# and is far less sensitive than the logit difference, so it gets its own (tighter) absolute tolerance.
# Triton: matmul operands rounded to the token dtype (fp32: exact "ieee" dots), fp32 accumulation; measured
# worst errors over the widths here: fp16 score 0.17x / prob 0.14x of these, bf16 score 0.37x / prob 0.28x.
TRITON_TOLERANCES = [(torch.float32, 2e-5, 2e-5, 5e-6), (torch.float16, 6e-3, 6e-3, 2e-3),
                     (torch.bfloat16, 0.1, 0.05, 2.5e-2)]
TRITON_TOL = {dt: tol for dt, *tol in TRITON_TOLERANCES}
# C++: float32 throughout for every token dtype (GELU via a polynomial erf, |error| < 1e-6).
CPU_TOLERANCES = [(torch.float32, 2e-5, 2e-5, 5e-6), (torch.float16, 2e-5, 2e-5, 5e-6),
                  (torch.bfloat16, 2e-5, 2e-5, 5e-6)]
CPU_TOL = {dt: tol for dt, *tol in CPU_TOLERANCES}

# Spatial tokens per image (cls and package rows are added): ViT-like 196 / 122 / 30, odd sizes, a single
# spatial token, and an image with no spatial token at all (only cls + packages).
CPU_SPATIAL = [196, 122, 1, 30, 0, 7]
TRITON_SPATIAL = [30, 1, 0, 70, 5]  # small: the interpreter is slow
PACKAGES = [0, 1, 2, 3]


def _need(backend):
    if backend not in ops.available_backends("token_scores"):
        pytest.skip(f"the {backend!r} backend is not usable here")


def make_weights(num_heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """Selector weights (TOKEN_SCORES_WEIGHTS order) scaled so that logits and SE weights vary by O(1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in _validate.token_scores_weight_shapes(num_heads, head_dim).items():
        if name == "ln_weight":
            t = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif len(shape) == 2:
            t = 1.5 * torch.randn(shape, generator=gen) / shape[1] ** 0.5
        else:
            t = 0.2 * torch.randn(shape, generator=gen)
        out.append(t.to(dtype=dtype, device=device))
    return out


def make_tokens(spatial, num_packages, C, dtype, device="cpu", seed=1, row_stride=None, num_prefix=1):
    """x (T, C) of images [num_prefix prefix rows, spatial, packages] and cu_seqlens; with row_stride, x is a
    row-slice view of a wider buffer (x.stride(0) == row_stride > C)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [num_prefix + n + num_packages for n in spatial]
    T = sum(lengths)
    # Per-channel offsets so that head means (the SE input) differ between heads.
    base = 1.5 * torch.randn(T, C, generator=gen) + torch.randn(1, C, generator=gen)
    if row_stride is None:
        x = base.to(dtype).to(device)
    else:
        # Built on the target device: .to(device) of a view with gaps would return a contiguous copy.
        wide = torch.full((T, row_stride), float("nan"), dtype=dtype, device=device)
        wide[:, 3:3 + C] = base.to(dtype).to(device)
        x = wide[:, 3:3 + C]
        assert x.stride(0) == row_stride and x.stride(1) == 1
    return x, make_cu_seqlens(lengths, device)


def oracle(x, cu, num_packages, num_heads, weights, num_prefix=1):
    return ops.token_scores(x.double().cpu(), cu.cpu(), num_packages, num_heads,
                            *[w.double().cpu() for w in weights], num_prefix=num_prefix, backend="reference")


def special_rows(cu, num_packages, num_prefix=1):
    """Boolean mask (T,) of prefix (cls) and package rows."""
    bounds = cu.tolist()
    mask = torch.zeros(bounds[-1], dtype=torch.bool)
    for s, e in zip(bounds[:-1], bounds[1:]):
        mask[s:s + num_prefix] = True
        mask[e - num_packages:e] = True
    return mask


def check_against_oracle(out, x, cu, num_packages, num_heads, weights, tol, images=None, num_prefix=1):
    """Compare (keep_score, keep_prob) with the oracle on every image, or on the listed `images` only (the
    float64 reference runs image by image, slowly; images are independent, so a subset is a fair check).
    Every row is checked for NaN and for the exact +inf / 1 of cls and package rows."""
    score, prob = (t.cpu() for t in out)
    assert score.dtype == torch.float32 and prob.dtype == torch.float32
    assert score.shape == (x.shape[0],) and prob.shape == (x.shape[0],)
    assert not score.isnan().any() and not prob.isnan().any()
    special = special_rows(cu, num_packages, num_prefix)
    assert torch.equal(score[special], torch.full_like(score[special], INF))
    assert torch.equal(prob[special], torch.ones_like(prob[special]))
    if images is not None:
        bounds = cu.tolist()
        rows = torch.cat([torch.arange(bounds[b], bounds[b + 1]) for b in images])
        x, score, prob, special = x[rows.to(x.device)], score[rows], prob[rows], special[rows]
        cu = make_cu_seqlens([bounds[b + 1] - bounds[b] for b in images])
    ref_score, ref_prob = oracle(x, cu, num_packages, num_heads, weights, num_prefix)
    atol, rtol, prob_atol = tol
    torch.testing.assert_close(score[~special], ref_score[~special].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(prob[~special], ref_prob[~special].float(), atol=prob_atol, rtol=0)
    # The test data must make scores vary, or the comparison proves little.
    assert ref_score[~special].std() > 0.05


# Images of a 257-image batch compared with the oracle: both ends, the middle, and a spread in between.
IMAGES_OF_257 = [0, 1, 2, 63, 64, 127, 128, 129, 200, 254, 255, 256] + list(range(5, 257, 23))


# ---- C++ backend ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_packages", PACKAGES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,H", WIDTHS + SMALL_WIDTHS)
def test_cpu_matches_oracle(C, H, dtype, num_packages):
    _need("cpu")
    x, cu = make_tokens(CPU_SPATIAL, num_packages, C, dtype)
    w = make_weights(H, C // H)
    out = ops.token_scores(x, cu, num_packages, H, *w, backend="cpu")
    check_against_oracle(out, x, cu, num_packages, H, w, CPU_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C,H", [(192, 3), (320, 5)])
def test_cpu_weights_in_token_dtype(C, H, dtype):
    _need("cpu")
    x, cu = make_tokens([196, 1, 30], 1, C, dtype)
    w = make_weights(H, C // H, dtype=dtype)
    out = ops.token_scores(x, cu, 1, H, *w, backend="cpu")
    check_against_oracle(out, x, cu, 1, H, w, CPU_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_strided_rows(dtype):
    _need("cpu")
    C, H = 384, 6
    x, cu = make_tokens([122, 1, 30], 2, C, dtype, row_stride=C + 40)
    w = make_weights(H, C // H)
    out = ops.token_scores(x, cu, 2, H, *w, backend="cpu")
    check_against_oracle(out, x, cu, 2, H, w, CPU_TOL[dtype])
    torch.testing.assert_close(out, ops.token_scores(x.contiguous(), cu, 2, H, *w, backend="cpu"), atol=0, rtol=0)


@pytest.mark.parametrize("C,H", [(192, 3), (40, 2)])
def test_cpu_257_images(C, H):
    _need("cpu")
    gen = torch.Generator().manual_seed(3)
    spatial = random_lengths(257, 0, 40, generator=gen)
    x, cu = make_tokens(spatial, 1, C, torch.float32)
    w = make_weights(H, C // H)
    out = ops.token_scores(x, cu, 1, H, *w, backend="cpu")
    check_against_oracle(out, x, cu, 1, H, w, CPU_TOL[torch.float32], images=IMAGES_OF_257)


def test_cpu_one_image():
    _need("cpu")
    x, cu = make_tokens([196], 0, 384, torch.bfloat16)
    w = make_weights(6, 64)
    check_against_oracle(ops.token_scores(x, cu, 0, 6, *w, backend="cpu"), x, cu, 0, 6, w, CPU_TOL[torch.bfloat16])


def test_cpu_bitwise_same_for_any_threads_and_split():
    """Every value comes from the same serial code: 1 or 2 threads, and an image alone (rows split over
    threads) or inside a batch (one image per thread), give bitwise the same output."""
    _need("cpu")
    C, H = 384, 6
    x, cu = make_tokens([196, 122, 30, 1, 0, 77, 5, 196], 1, C, torch.float16)
    w = make_weights(H, C // H)
    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ops.token_scores(x, cu, 1, H, *w, backend="cpu"))
        alone = ops.token_scores(x[:198], make_cu_seqlens([198]), 1, H, *w, backend="cpu")
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for a, b in zip(alone, outs[0]):
        assert torch.equal(a, b[:198])


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from tests.test_token_scores import make_tokens, make_weights
from spvit_kernels import ops
x, cu = make_tokens([196, 30, 1, 77], 1, 768, torch.float32)
w = make_weights(12, 64)
torch.save(ops.token_scores(x, cu, 1, 12, *w, backend="cpu"), sys.argv[1])
"""


def test_cpu_every_instruction_set(tmp_path):
    """The C++ kernel's three builds (x86-64 baseline, AVX2, AVX-512 with FMA), forced with SPVIT_TS_ISA in fresh
    processes (the choice is made once per process): each agrees with the float64 oracle, and the baseline and
    AVX2 builds, which run the same operations in the same order, agree bitwise. On a CPU without AVX2 /
    AVX-512 the cap leaves the widest one it has, which the same checks cover."""
    _need("cpu")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {}
    for isa in ("base", "avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, SPVIT_TS_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path), root], env=env, check=True, timeout=300)
        outs[isa] = torch.load(path)
    x, cu = make_tokens([196, 30, 1, 77], 1, 768, torch.float32)
    w = make_weights(12, 64)
    for isa, out in outs.items():
        check_against_oracle(out, x, cu, 1, 12, w, CPU_TOL[torch.float32])
    for a, b in zip(outs["base"], outs["avx2"]):
        assert torch.equal(a, b)


def test_cpu_is_the_default_on_cpu():
    _need("cpu")
    assert _registry.resolve("token_scores", None, "cpu").name == "cpu"
    x, cu = make_tokens([30, 1], 1, 192, torch.float32)
    w = make_weights(3, 64)
    for a, b in zip(ops.token_scores(x, cu, 1, 3, *w), ops.token_scores(x, cu, 1, 3, *w, backend="cpu")):
        assert torch.equal(a, b)
    for a, b in zip(torch.ops.spvit.token_scores(x, cu, 1, 3, *w), ops.token_scores(x, cu, 1, 3, *w, backend="cpu")):
        assert torch.equal(a, b)


def test_cpu_native_rechecks_bounds():
    """A direct call of the native kernel with inconsistent shapes raises instead of reading out of bounds."""
    fn = native("token_scores_cpu")
    if fn is None:
        pytest.skip("no native CPU kernel in this build")
    x, cu = make_tokens([5], 0, 192, torch.float32)
    w = make_weights(3, 64)
    bad = list(w)
    bad[2] = torch.zeros(8, 8)  # w_in too small
    with pytest.raises(RuntimeError, match="w_in"):
        fn(x, cu, 0, 3, *bad)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        fn(x, cu.long(), 0, 3, *w)
    # Out-of-range cu_seqlens are clamped (wrong numbers, but no out-of-bounds access).
    score, prob = fn(x, torch.tensor([0, 10**6], dtype=torch.int32), 0, 3, *w)
    assert score.shape == (x.shape[0],)


def test_opcheck_cpu():
    x, cu = make_tokens([30, 1, 0], 1, 192, torch.float32)
    w = make_weights(3, 64)
    torch.library.opcheck(torch.ops.spvit.token_scores.default, (x, cu, 1, 3, *w))


# ---- Triton backend under TRITON_INTERPRET=1 --------------------------------------------------------------


@requires_triton_interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,H", WIDTHS)
def test_triton_interpret_widths(C, H, dtype):
    x, cu = make_tokens(TRITON_SPATIAL, 2, C, dtype)
    w = make_weights(H, C // H)
    out = ops.token_scores(x, cu, 2, H, *w, backend="triton")
    check_against_oracle(out, x, cu, 2, H, w, TRITON_TOL[dtype])


@requires_triton_interpret
@pytest.mark.parametrize("num_packages", PACKAGES)
@pytest.mark.parametrize("C,H", [(192, 3)] + SMALL_WIDTHS)
def test_triton_interpret_packages(C, H, num_packages):
    x, cu = make_tokens([9, 1, 0, 70], num_packages, C, torch.float32)
    w = make_weights(H, C // H)
    out = ops.token_scores(x, cu, num_packages, H, *w, backend="triton")
    check_against_oracle(out, x, cu, num_packages, H, w, TRITON_TOL[torch.float32])


@requires_triton_interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_interpret_weights_in_token_dtype_strided(dtype):
    C, H = 256, 4
    x, cu = make_tokens([30, 1, 12], 1, C, dtype, row_stride=C + 24)
    w = make_weights(H, C // H, dtype=dtype)
    out = ops.token_scores(x, cu, 1, H, *w, backend="triton")
    check_against_oracle(out, x, cu, 1, H, w, TRITON_TOL[dtype])


@requires_triton_interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_interpret_common_offset(dtype):
    """Every channel shifted by 5 standard deviations of the tokens: the 16-bit kernel takes the LayerNorm's
    centring from its centred weights and the variance as E[x^2] - mean^2, whose errors grow with |mean| / std
    (see spvit_kernels/triton/token_scores.py); both must still hold the dtype's tolerance."""
    x, cu = make_tokens([70, 30, 5], 2, 384, torch.float32)
    x = (x + 5 * x.std()).to(dtype)
    w = make_weights(6, 64)
    out = ops.token_scores(x, cu, 2, 6, *w, backend="triton")
    check_against_oracle(out, x, cu, 2, 6, w, TRITON_TOL[dtype])


@requires_triton_interpret
def test_triton_interpret_one_image_deterministic():
    x, cu = make_tokens([64], 1, 384, torch.float32)
    w = make_weights(6, 64)
    a = ops.token_scores(x, cu, 1, 6, *w, backend="triton")
    b = ops.token_scores(x, cu, 1, 6, *w, backend="triton")
    check_against_oracle(a, x, cu, 1, 6, w, TRITON_TOL[torch.float32])
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@requires_triton_interpret
def test_triton_interpret_257_images():
    gen = torch.Generator().manual_seed(4)
    spatial = random_lengths(257, 0, 3, generator=gen)
    x, cu = make_tokens(spatial, 1, 32, torch.float32)
    w = make_weights(2, 16)
    out = ops.token_scores(x, cu, 1, 2, *w, backend="triton")
    check_against_oracle(out, x, cu, 1, 2, w, TRITON_TOL[torch.float32], images=IMAGES_OF_257)


# ---- prefix rows (num_prefix) on every backend --------------------------------------------------------------

# num_prefix 0 (class-free), 1 (cls), 2 (cls + distillation), 5 (cls + 4 registers).
PREFIXES = [0, 1, 2, 5]
PREFIX_BACKENDS = [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu"),
                   pytest.param("triton", id="triton", marks=requires_triton_interpret)]
# Spatial rows per image, images with 0 and 1 candidates included (the interpreter gets the small list).
PREFIX_SPATIAL = {"reference": [122, 0, 1, 30], "cpu": [196, 0, 122, 1, 30], "triton": [30, 1, 0, 9]}


def _prefix_tol(backend, dtype):
    # The reference computes float32 for every token dtype from the same rounded tokens, like the C++ kernel.
    return TRITON_TOL[dtype] if backend == "triton" else CPU_TOL[dtype]


@pytest.mark.parametrize("backend", PREFIX_BACKENDS)
@pytest.mark.parametrize("num_prefix", PREFIXES)
@pytest.mark.parametrize("num_packages", [0, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_rows_match_oracle(backend, num_prefix, num_packages, dtype):
    """Prefix rows are +inf / 1 exactly; every other row matches the float64 oracle."""
    _need(backend)
    C, H = (72, 3) if backend == "triton" else (192, 3)
    x, cu = make_tokens(PREFIX_SPATIAL[backend], num_packages, C, dtype, num_prefix=num_prefix)
    w = make_weights(H, C // H)
    out = ops.token_scores(x, cu, num_packages, H, *w, num_prefix=num_prefix, backend=backend)
    check_against_oracle(out, x, cu, num_packages, H, w, _prefix_tol(backend, dtype), num_prefix=num_prefix)


def _strip_prefix(x, cu, num_prefix):
    """The same batch without each image's first num_prefix rows; also the row indices that were kept."""
    bounds = cu.tolist()
    rows = torch.cat([torch.arange(s + num_prefix, e) for s, e in zip(bounds[:-1], bounds[1:])])
    lengths = [e - s - num_prefix for s, e in zip(bounds[:-1], bounds[1:])]
    return x[rows], make_cu_seqlens(lengths), rows


@pytest.mark.parametrize("backend", PREFIX_BACKENDS)
@pytest.mark.parametrize("num_prefix", [1, 2, 5])
def test_prefix_rows_do_not_enter_the_scores(backend, num_prefix):
    """Independent of any oracle: the scores of an image with num_prefix prefix rows equal those of the same
    image without them (num_prefix = 0), and do not change when the prefix rows' values change; so prefix
    rows are neither scored nor part of the global mean."""
    _need(backend)
    C, H, P = 72, 3, 1
    x, cu = make_tokens(PREFIX_SPATIAL["triton"], P, C, torch.float32, num_prefix=num_prefix)
    w = make_weights(H, C // H)
    score, prob = ops.token_scores(x, cu, P, H, *w, num_prefix=num_prefix, backend=backend)
    x_short, cu_short, rows = _strip_prefix(x, cu, num_prefix)
    short_score, short_prob = ops.token_scores(x_short, cu_short, P, H, *w, num_prefix=0, backend=backend)
    torch.testing.assert_close(score[rows], short_score, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(prob[rows], short_prob, atol=1e-6, rtol=1e-6)
    special = special_rows(cu, P, num_prefix)
    assert not special[rows].all() and (score[rows][~special[rows]].std() > 0.05)
    changed = x.clone()
    changed[special_rows(cu, 0, num_prefix)] = 1e3 * torch.randn_like(changed[special_rows(cu, 0, num_prefix)])
    for a, b in zip(ops.token_scores(changed, cu, P, H, *w, num_prefix=num_prefix, backend=backend),
                    (score, prob)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", PREFIX_BACKENDS)
def test_prefix_zero_with_empty_images(backend):
    """num_prefix = 0 and no package rows: an image may have no rows at all."""
    _need(backend)
    C, H = 72, 3
    x, cu = make_tokens([9, 0, 1, 0, 30], 0, C, torch.float32, num_prefix=0)
    w = make_weights(H, C // H)
    out = ops.token_scores(x, cu, 0, H, *w, num_prefix=0, backend=backend)
    check_against_oracle(out, x, cu, 0, H, w, _prefix_tol(backend, torch.float32), num_prefix=0)


def test_opcheck_cpu_num_prefix():
    x, cu = make_tokens([30, 1, 0], 1, 192, torch.float32, num_prefix=2)
    w = make_weights(3, 64)
    torch.library.opcheck(torch.ops.spvit.token_scores.default, (x, cu, 1, 3, *w, 2))


@pytest.mark.parametrize("num_prefix", [0, 2])
def test_torch_compile_fullgraph_num_prefix(num_prefix):
    _need("cpu")
    x, cu = make_tokens([30, 1, 0], 1, 192, torch.float32, num_prefix=num_prefix)
    w = make_weights(3, 64)
    fn = torch.compile(lambda x, cu, *w: ops.token_scores(x, cu, 1, 3, *w, num_prefix=num_prefix),
                       backend="aot_eager", fullgraph=True)
    check_against_oracle(fn(x, cu, *w), x, cu, 1, 3, w, CPU_TOL[torch.float32], num_prefix=num_prefix)


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_bad_num_prefix_is_named(backend):
    x, cu, P, H, w = _args()  # images of 1 + 5 + 1 and 1 + 3 + 1 rows
    with pytest.raises(ValueError, match="num_prefix"):
        ops.token_scores(x, cu, P, H, *w, num_prefix=-1, backend=backend)
    with pytest.raises(ValueError, match="num_prefix"):
        ops.token_scores(x, cu, P, H, *w, num_prefix=6, backend=backend)  # the second image has 5 rows
    with pytest.raises(TypeError, match="num_prefix"):
        ops.token_scores(x, cu, P, H, *w, num_prefix=1.0, backend=backend)
    with pytest.raises(ValueError, match="num_packages"):
        ops.token_scores(x, cu, P, H, *w, num_prefix=5, backend=backend)  # 5 prefix + 1 package > 5 rows


# ---- bad input --------------------------------------------------------------------------------------------


def _args(C=192, H=3, dtype=torch.float32):
    x, cu = make_tokens([5, 3], 1, C, dtype)
    return x, cu, 1, H, make_weights(H, C // H)


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
@pytest.mark.parametrize("index,name", [(2, "w_in"), (4, "w1"), (8, "w3"), (11, "se_b1"), (13, "se_b2")])
def test_bad_weight_shape_is_named(backend, index, name):
    x, cu, P, H, w = _args()
    w[index] = w[index][..., :-1] if w[index].dim() == 2 else w[index][:-1]
    with pytest.raises(ValueError, match=name):
        ops.token_scores(x, cu, P, H, *w, backend=backend)


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_bad_arguments_are_named(backend):
    x, cu, P, H, w = _args()
    with pytest.raises(ValueError, match="num_heads"):
        ops.token_scores(x, cu, P, 7, *w, backend=backend)  # 192 % 7 != 0
    with pytest.raises(ValueError, match="num_heads"):
        ops.token_scores(x[:, :180], cu, P, 3, *w, backend=backend)  # head dim 60, weights for 64
    with pytest.raises(TypeError, match="se_w2"):
        ops.token_scores(x, cu, P, H, *w[:12], w[12].double(), w[13], backend=backend)
    with pytest.raises(TypeError, match="ln_weight"):
        ops.token_scores(x.half(), cu, P, H, w[0].bfloat16(), *w[1:], backend=backend)
    with pytest.raises(TypeError, match="x"):
        ops.token_scores(x.long(), cu, P, H, *w, backend=backend)
    with pytest.raises(TypeError, match="cu_seqlens"):
        ops.token_scores(x, cu.long(), P, H, *w, backend=backend)
    with pytest.raises(ValueError, match="x"):
        ops.token_scores(x[None], cu, P, H, *w, backend=backend)
    with pytest.raises(ValueError, match="x"):
        ops.token_scores(x.t().contiguous().t(), cu, P, H, *w, backend=backend)  # columns not contiguous
    with pytest.raises(ValueError, match="b_in"):
        ops.token_scores(x, cu, P, H, *w[:3], w[3].to("meta"), *w[4:], backend=backend)  # wrong device
    with pytest.raises(ValueError, match="num_packages"):
        ops.token_scores(x, cu, 5, H, *w, backend=backend)  # the 5-row image cannot hold cls + 5 packages
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.token_scores(x, cu[:-1], P, H, *w, backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_triton_without_gpu_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, cu, P, H, w = _args()
    with pytest.raises(ValueError, match="backend='triton'"):
        ops.token_scores(x, cu, P, H, *w, backend="triton")


# ---- GPU (CUDA) -------------------------------------------------------------------------------------------


def _poison_cuda_cache(nbytes):
    """Fill the caching allocator's free blocks with NaN, so outputs the kernel forgets to write show."""
    junk = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
    del junk


@requires_gpu
@pytest.mark.parametrize("num_packages", PACKAGES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,H", WIDTHS + SMALL_WIDTHS)
def test_triton_cuda_matches_oracle(C, H, dtype, num_packages):
    x, cu = make_tokens(CPU_SPATIAL, num_packages, C, dtype, device="cuda")
    w = make_weights(H, C // H, device="cuda")
    _poison_cuda_cache(x.shape[0] * (2 * H + 2) * 4)
    out = ops.token_scores(x, cu, num_packages, H, *w, backend="triton")
    check_against_oracle(out, x, cu, num_packages, H, w, TRITON_TOL[dtype])
    for a, b in zip(out, ops.token_scores(x, cu, num_packages, H, *w)):  # the default on CUDA
        assert torch.equal(a, b)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_cuda_257_images_strided_token_dtype_weights(dtype):
    C, H = 384, 6
    gen = torch.Generator().manual_seed(5)
    spatial = random_lengths(257, 0, 196, generator=gen)
    x, cu = make_tokens(spatial, 2, C, dtype, device="cuda", row_stride=C + 64)
    for wdt in (torch.float32, dtype):
        w = make_weights(H, C // H, dtype=wdt, device="cuda")
        out = ops.token_scores(x, cu, 2, H, *w, backend="triton")
        check_against_oracle(out, x, cu, 2, H, w, TRITON_TOL[dtype], images=IMAGES_OF_257)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_cuda_bitwise_deterministic(dtype):
    C, H = 384, 6
    x, cu = make_tokens([196] * 64 + [122] * 64 + [30, 1, 0], 1, C, dtype, device="cuda")
    w = make_weights(H, C // H, device="cuda")
    a = ops.token_scores(x, cu, 1, H, *w, backend="triton")
    for _ in range(3):
        b = ops.token_scores(x, cu, 1, H, *w, backend="triton")
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@requires_gpu
def test_triton_cuda_under_torch_compile():
    """torch.compile(fullgraph=True) traces the op through its fake impl and runs the Triton backend."""
    C, H = 192, 3
    x, cu = make_tokens([196, 30, 1], 1, C, torch.bfloat16, device="cuda")
    w = make_weights(H, C // H, device="cuda")

    @torch.compile(fullgraph=True)
    def f(x, cu, *w):
        return ops.token_scores(x, cu, 1, H, *w)

    out = f(x, cu, *w)
    check_against_oracle(out, x, cu, 1, H, w, TRITON_TOL[torch.bfloat16])


@requires_gpu
def test_triton_cuda_no_host_sync_and_cuda_graph():
    """With trusted cu_seqlens the op never synchronises, and it can be captured in a CUDA graph."""
    C, H = 384, 6
    x, cu = make_tokens([196, 122, 30, 1, 0], 2, C, torch.float16, device="cuda")
    w = make_weights(H, C // H, device="cuda")
    expected = ops.token_scores(x, cu, 2, H, *w, backend="triton")  # also compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with ops.unchecked_seqlens():
            out = ops.token_scores(x, cu, 2, H, *w, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.spvit.token_scores(x, cu, 2, H, *w)
    for t in captured:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b, c in zip(expected, out, captured):
        assert torch.equal(a, b) and torch.equal(a, c)


@requires_gpu
def test_triton_cuda_row_offsets_past_2_31():
    """x with more than 2^31 elements: the last image starts past element 2^31 (64-bit row offsets)."""
    C, H = 384, 6
    rows_needed = (2**31) // C + 400
    try:
        x = torch.empty((rows_needed, C), dtype=torch.bfloat16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x.normal_()
    tail_spatial = [196, 30]
    tail_rows = sum(1 + n + 1 for n in tail_spatial)
    head_rows = rows_needed - tail_rows
    lengths = [head_rows] + [1 + n + 1 for n in tail_spatial]
    cu = make_cu_seqlens(lengths, "cuda")
    w = make_weights(H, C // H, device="cuda")
    score, prob = ops.token_scores(x, cu, 1, H, *w, backend="triton")
    tail = x[head_rows:]
    tail_cu = make_cu_seqlens(lengths[1:])
    check_against_oracle((score[head_rows:], prob[head_rows:]), tail, tail_cu, 1, H, w, TRITON_TOL[torch.bfloat16])
