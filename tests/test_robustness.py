"""Regression tests of edge cases that once answered wrongly or badly (bad inputs, strided index tensors, empty
batches, top-k images with few candidates, autograd through the inference-only accelerated model)."""

import copy

import pytest
import torch

import spvit_kernels
from spvit_kernels import accelerate, ops
from spvit_kernels.models import calibrate_thresholds, create_model

from .test_token_scores import make_tokens, make_weights
from .utils import make_cu_seqlens, non_contiguous

NUM_CLASSES = 10


def _backends(op):
    """Backends of `op` that run on CPU tensors here (triton only under the interpreter)."""
    from spvit_kernels.ops import _registry

    return [b for b in ops.available_backends(op) if "cpu" in _registry._BACKENDS[op][b].device_types()]


def _strided(cu):
    """The same values as `cu`, as a non-contiguous view."""
    return non_contiguous(cu)


# --- 1. a strided cu_seqlens gives the same answer on every backend and the raw entry point --------------------

@pytest.mark.parametrize("backend", _backends("token_scores") + ["raw"])
def test_token_scores_strided_cu_seqlens(backend):
    H, d = 2, 16
    x, cu = make_tokens([4, 0, 7], 1, H * d, torch.float32)
    w = make_weights(H, d)
    want = ops.token_scores(x, cu, 1, H, *w, backend="reference")
    if backend == "raw":
        got = torch.ops.spvit.token_scores(x, _strided(cu), 1, H, *w)
    else:
        got = ops.token_scores(x, _strided(cu), 1, H, *w, backend=backend)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", _backends("varlen_attention") + ["raw"])
def test_varlen_attention_strided_cu_seqlens(backend):
    q, k, v = torch.randn(3, 17, 1, 32).unbind(0)
    cu = make_cu_seqlens([5, 9, 3])
    want = ops.varlen_attention(q, k, v, cu, backend="reference")
    if backend == "raw":
        got = torch.ops.spvit.varlen_attention(q, k, v, _strided(cu))
    else:
        got = ops.varlen_attention(q, k, v, _strided(cu), backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", _backends("prune_pack") + ["raw"])
def test_prune_pack_strided_cu_seqlens(backend):
    x = torch.randn(19, 8)
    cu = make_cu_seqlens([6, 2, 11])
    s, p = torch.randn(19), torch.rand(19)
    want = ops.prune_pack(x, cu, s, p, 0, "threshold", backend="reference")
    if backend == "raw":
        got = torch.ops.spvit.prune_pack(x, _strided(cu), s, p, 0, "threshold")
    else:
        got = ops.prune_pack(x, _strided(cu), s, p, 0, "threshold", backend=backend)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


# --- 2. top-k with an image of fewer candidates than num_keep: one size, eager and compiled ----------------------

def _few_candidates_batch():
    """Images of 10, 2 and 10 candidates (+ cls + 1 package row); num_keep 5: image 1 keeps only 2."""
    lengths = [12, 4, 12]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), 16, generator=g)
    return x, make_cu_seqlens(lengths), torch.randn(x.shape[0], generator=g), torch.rand(x.shape[0], generator=g)


def _topk(x, cu, s, p):
    return torch.ops.spvit.prune_pack(x, cu, s, p, 1, "topk", 0.0, 5, "mean")


@pytest.mark.parametrize("backend", _backends("prune_pack"))
def test_topk_few_candidates_has_the_fixed_size(backend):
    batch = _few_candidates_batch()
    rows = 3 * (1 + 5 + 1 + 1)  # B * (cls + num_keep + old package + new package)
    x_out, cu_out, src = ops.prune_pack(*batch, 1, "topk", num_keep=5, backend=backend)
    assert x_out.shape == (rows, 16) and src.shape == (rows,)
    assert cu_out.tolist() == [0, 8, 13, 21]
    assert torch.equal(x_out[21:], torch.zeros(3, 16)) and src[21:].tolist() == [-1] * 3
    raw = _topk(*batch)
    for a, b in zip(raw, (x_out, cu_out, src)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_topk_few_candidates_compiled_matches_eager(compiler):
    batch = _few_candidates_batch()
    eager = ops.prune_pack(*batch, 1, "topk", num_keep=5)
    torch._dynamo.reset()
    compiled = torch.compile(_topk, fullgraph=True, backend=compiler)(*batch)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_topk_num_keep_beyond_every_image_is_bounded_by_the_shapes():
    """num_keep larger than any image could hold: k = T - B * (1 + num_packages), not num_keep rows each."""
    x, cu, s, p = _few_candidates_batch()
    out = ops.prune_pack(x, cu, s, p, 1, "topk", num_keep=10**6, backend="reference")
    assert out[0].shape[0] == 3 * (1 + 22 + 2)


# --- 3. the accelerated model with autograd enabled: never silently wrong gradients -----------------------------

@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = create_model("spvit_deit_tiny", num_classes=NUM_CLASSES)
    return ref, accelerate(copy.deepcopy(ref))


def _images(batch, seed=0):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_accelerated_backward_raises(models):
    _, acc = models
    images = _images(1)
    with torch.no_grad():
        want = acc(images)
    logits = acc(images)  # grad mode on: the forward still works and gives the same logits
    torch.testing.assert_close(logits, want, atol=0, rtol=0)
    assert logits.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        logits.sum().backward()
    assert all(p.grad is None for p in acc.parameters())
    # Only the images require grad (a frozen model): still no silent answer.
    frozen = copy.deepcopy(acc).requires_grad_(False)
    logits, _ = frozen(images.clone().requires_grad_(), return_info=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        logits.sum().backward()
    with torch.no_grad():
        assert not acc(images).requires_grad


# --- 4. / 7. batches of 0 images, images of the wrong shape ------------------------------------------------------

def test_batch_of_zero_images(models):
    ref, acc = models
    empty = torch.zeros(0, 3, 224, 224)
    with torch.no_grad():
        assert ref(empty).shape == (0, NUM_CLASSES)
        assert acc(empty).shape == (0, NUM_CLASSES)
        logits, info = acc(empty, return_info=True)
    assert logits.shape == (0, NUM_CLASSES) and info["num_kept"].shape == (3, 0)


@pytest.mark.parametrize("shape", [(3, 224, 224), (1, 3, 200, 200), (1, 1, 224, 224), (1, 3, 224)])
def test_images_of_the_wrong_shape_are_named(models, shape):
    for model in models:
        with torch.no_grad(), pytest.raises(ValueError, match=r"images must have shape \(B, 3, 224, 224\)"):
            model(torch.zeros(shape))
    with pytest.raises(TypeError, match="images"):
        models[1]([[0.0]])


@pytest.mark.parametrize("family", ["spvit_deit_tiny", "spvit_lvvit_s", "spvit_pit_ti"])
def test_images_of_another_dtype_are_named(family):
    torch.manual_seed(0)
    ref = create_model(family, num_classes=NUM_CLASSES).eval()
    size = ref.vit.patch_embed.img_size if hasattr(ref.vit.patch_embed, "img_size") else (224, 224)
    for model in (ref, accelerate(copy.deepcopy(ref))):
        for dtype in (torch.uint8, torch.int64, torch.float64, torch.bool):
            images = torch.zeros(1, 3, *size, dtype=dtype)
            with torch.no_grad(), pytest.raises(TypeError, match=r"images must be a float32 tensor .* got "
                                                + str(dtype).replace("torch.", "")):
                model(images)
    # under autocast float32 and 16-bit images are accepted (autocast casts for the convolution); float64 is not
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ref(torch.zeros(1, 3, *size, dtype=torch.bfloat16)).shape == (1, NUM_CLASSES)
        with pytest.raises(TypeError, match="got float64"):
            ref(torch.zeros(1, 3, *size, dtype=torch.float64))


# --- 5. calibrate_thresholds with nothing to calibrate on --------------------------------------------------------

def test_calibrate_thresholds_refuses_empty_and_nan_batches(models):
    ref = copy.deepcopy(models[0])
    before = ref.config
    with pytest.raises(ValueError, match="images: a batch of 0"):
        calibrate_thresholds(ref, torch.zeros(0, 3, 224, 224))
    with pytest.raises(ValueError, match="images: every keep score at stage 0 is NaN"):
        calibrate_thresholds(ref, torch.full((2, 3, 224, 224), float("nan")))
    assert ref.config == before
    assert spvit_kernels.calibrate_thresholds is calibrate_thresholds


# --- 6. raw entry points with a tensor on another device ----------------------------------------------------------

def test_raw_ops_reject_tensors_on_meta():
    H, d = 2, 16
    x, cu = make_tokens([4, 3], 0, H * d, torch.float32)
    w = make_weights(H, d)
    meta = lambda t: t.to("meta")  # noqa: E731
    with pytest.raises(ValueError, match="cu_seqlens must be on cpu"):
        torch.ops.spvit.token_scores(x, meta(cu), 0, H, *w)
    with pytest.raises(ValueError, match="w2 must be on cpu"):
        torch.ops.spvit.token_scores(x, cu, 0, H, *w[:6], meta(w[6]), *w[7:])
    s, p = torch.randn(x.shape[0]), torch.rand(x.shape[0])
    with pytest.raises(ValueError, match="cu_seqlens must be on cpu"):
        torch.ops.spvit.prune_pack(x, meta(cu), s, p, 0, "topk", 0.0, 2, "mean")
    with pytest.raises(ValueError, match="keep_prob must be on cpu"):
        torch.ops.spvit.prune_pack(x, cu, s, meta(p), 0, "threshold")
    q = x.view(-1, 1, 32)
    with pytest.raises(ValueError, match="cu_seqlens must be on cpu"):
        torch.ops.spvit.varlen_attention(q, q, q, meta(cu))
    with pytest.raises(ValueError, match="v must be on cpu"):
        torch.ops.spvit.varlen_attention(q, q, meta(q), cu)
    # All on meta: shapes only, as torch.compile's tracing needs.
    out = torch.ops.spvit.token_scores(meta(x), meta(cu), 0, H, *map(meta, w))
    assert out[0].device.type == "meta" and out[0].shape == (x.shape[0],)


def test_python_ops_on_meta_reach_the_fake_kernels():
    """spvit_kernels.ops.* with meta tensors: the shapes of the real call (top-k, token_scores, varlen), and one
    sentence for threshold mode, whose output size needs the data."""
    H, d = 2, 16
    x, cu = make_tokens([5, 3, 9], 1, H * d, torch.float32)
    w = make_weights(H, d)
    meta = lambda t: t.to("meta")  # noqa: E731
    real = ops.token_scores(x, cu, 1, H, *w)
    fake = ops.token_scores(meta(x), meta(cu), 1, H, *map(meta, w))
    assert [(t.device.type, t.shape, t.dtype) for t in fake] == [("meta", t.shape, t.dtype) for t in real]
    s, p = real
    real = ops.prune_pack(x, cu, s, p, 1, "topk", num_keep=2)
    fake = ops.prune_pack(meta(x), meta(cu), meta(s), meta(p), 1, "topk", num_keep=2)
    assert [(t.device.type, t.shape, t.dtype) for t in fake] == [("meta", t.shape, t.dtype) for t in real]
    with pytest.raises(ValueError, match="x is a meta tensor: in mode='threshold'"):
        ops.prune_pack(meta(x), meta(cu), meta(s), meta(p), 1, "threshold")
    q = torch.randn(x.shape[0], 1, 32)
    out = ops.varlen_attention(meta(q), meta(q), meta(q), meta(cu))
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's x * x, on purpose
@pytest.mark.parametrize("backend", _backends("token_scores"))
@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_token_scores_huge_and_tiny_tokens_are_right_or_nan(backend, scale):
    """fp32 tokens near 1e20 square beyond fp32's range; LayerNorm is scale invariant, so the float64 answer is
    ordinary. Every backend gives it, or NaN (the float32 PyTorch reference): never a finite wrong number."""
    H, d = 2, 32
    x, cu = make_tokens([6, 1, 5], 1, H * d, torch.float32)
    w = make_weights(H, d)
    x = x * scale
    want = ops.token_scores(x.double(), cu, 1, H, *[t.double() for t in w], backend="reference")
    got = ops.token_scores(x, cu, 1, H, *w, backend=backend)
    for g, e in zip(got, want):
        finite = torch.isfinite(e)
        close = (g.double() - e).abs() <= 1e-3 * (1 + e.abs())
        assert bool((close | g.isnan())[finite].all()), (backend, g, e)
        assert torch.equal(g[~finite], e[~finite].float())  # prefix rows: +inf / 1
    if backend != "reference":  # the kernels compute the right answer
        assert bool(torch.isfinite(got[1]).all())


# --- 7. num_keep out of range ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _backends("prune_pack") + ["raw"])
@pytest.mark.parametrize("num_keep", [2**31, 2**63 - 1])
def test_num_keep_out_of_range_is_named(backend, num_keep):
    batch = _few_candidates_batch()
    with pytest.raises(ValueError, match="num_keep"):
        if backend == "raw":
            torch.ops.spvit.prune_pack(*batch, 1, "topk", 0.0, num_keep, "mean")
        else:
            ops.prune_pack(*batch, 1, "topk", num_keep=num_keep, backend=backend)
    if backend != "raw":
        with pytest.raises(ValueError, match="num_keep"):
            ops.prune_pack(*batch, 1, "topk", num_keep=2**63, backend=backend)


# --- 8. numbers given as 0-dim tensors: the Python functions take them as the raw entry points do ---------------

def test_zero_dim_tensor_numbers_agree_with_raw_ops():
    """PyTorch's parser gives the raw torch.ops.spvit.* entry points the value of a 0-dim tensor passed for an int or
    float argument; spvit_kernels.ops.* take it the same way and give the same answer."""
    H, d = 2, 16
    x, cu = make_tokens([7, 5, 9], 1, H * d, torch.float32)
    w = make_weights(H, d)
    s, p = ops.token_scores(x, cu, torch.tensor(1), torch.tensor(H), *w, num_prefix=torch.tensor(1))
    want = torch.ops.spvit.token_scores(x, cu, 1, H, *w)
    assert torch.equal(s, want[0]) and torch.equal(p, want[1])
    for mode, kwargs, raw in (("topk", {"num_keep": torch.tensor(3)}, (0.0, torch.tensor(3))),
                              ("threshold", {"threshold": torch.tensor(0.25)}, (torch.tensor(0.25),))):
        got = ops.prune_pack(x, cu, s, p, torch.tensor(1), mode, **kwargs)
        want = torch.ops.spvit.prune_pack(x, cu, s, p, 1, mode, *raw)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), mode
    q = torch.randn(x.shape[0], 2, 32)
    got = ops.varlen_attention(q, q, q, cu, max_seqlen=torch.tensor(64), softmax_scale=torch.tensor(0.3))
    assert torch.equal(got, torch.ops.spvit.varlen_attention(q, q, q, cu, 64, 0.3))
    q4 = torch.randn(1, 5, 2, 32)
    got = ops.policy_attention(q4, q4, q4, torch.ones(1, 5), torch.tensor(1e-3), torch.tensor(0.2))
    assert torch.equal(got, ops.policy_attention(q4, q4, q4, torch.ones(1, 5), 1e-3, 0.2))


@pytest.mark.parametrize("value, what", [
    (torch.tensor([3]), "shape"), (torch.tensor(3.0), "dtype"), (torch.tensor(True), "dtype"),
    (torch.tensor(3.0, requires_grad=True), "requires_grad"), (True, "bool")])
def test_number_tensors_that_are_not_numbers_are_named(value, what):
    """A tensor that is not a 0-dim number of the argument's kind (and a bool for an int) is refused, naming the
    argument. The raw entry points are laxer here: PyTorch's parser takes True as 1 and one-element tensors of any
    dtype before any of the op's code runs, which the op cannot see."""
    H, d = 2, 16
    x, cu = make_tokens([7, 5], 1, H * d, torch.float32)
    s, p = ops.token_scores(x, cu, 1, H, *make_weights(H, d))
    with pytest.raises(TypeError, match="num_keep must be an int"):
        ops.prune_pack(x, cu, s, p, 1, "topk", num_keep=value)
    if what in ("shape", "requires_grad") or (what == "dtype" and value.dtype == torch.bool):  # float: a fine scale
        q = torch.randn(x.shape[0], 2, 32)
        with pytest.raises(TypeError, match="softmax_scale must be a float"):
            ops.varlen_attention(q, q, q, cu, softmax_scale=value.float() if what == "shape" else value)
