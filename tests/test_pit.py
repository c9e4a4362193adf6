"""Tests of SPViT-PiT (spvit_kernels.models.pit, spvit_kernels.accelerate.pit).

The masked reference == the independent token-dropping oracle (tests/pit_oracle.py) in float64, with exact
kept sets; the accelerated model == the reference on CPU in float32 (exact kept sets, logits within the
tolerance of test_accelerate), top-k and threshold; bad configurations raise errors naming the field.
A small PiT (64 px: grids 7x7, 4x4, 2x2; depths 2, 4, 3) keeps the run short; head dim 48 (PiT-XS/S's)
exercises the zero padding of the accelerated attention, 32 (PiT-Ti's) the unpadded path.
"""

import copy

import pytest
import torch

from spvit_kernels import accelerate
from spvit_kernels.accelerate import AcceleratedPiT
from spvit_kernels.accelerate.pit import padded_varlen_attention
from spvit_kernels.models import SPViTPiT, calibrate_thresholds, create_model, from_timm, list_models

from .pit_oracle import pit_oracle_forward
from .test_accelerate import GPU_TOLS
from .test_accelerate import assert_no_host_sync, check_autocast_bfloat16_cpu, check_gpu_agreement
from .utils import make_cu_seqlens, requires_gpu

NUM_CLASSES = 5
IMG = 64
GRIDS = [(7, 7), (4, 4), (2, 2)]
STAGES = dict(selector_layers=(1, 4, 8), keep_ratios=(0.6, 0.5, 0.75))  # depths (2, 4, 3)
HEAD_DIMS = [48, 32]
PRUNINGS = ["topk", "threshold"]
ACC_TOL = 1e-4  # test_accelerate's CPU float32 tolerance (relative to the largest logit)


def _pit(head_dim, dtype=torch.float32, seed=0, depth=(2, 4, 3)):
    from timm.models.pit import PoolingVisionTransformer

    torch.manual_seed(seed)
    vit = PoolingVisionTransformer(img_size=IMG, patch_size=16, stride=8, base_dims=(head_dim,) * 3, depth=depth,
                                   heads=(2, 2, 4), num_classes=NUM_CLASSES)
    return vit.to(dtype).eval()


def _images(batch, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=g).to(dtype)


def _model(head_dim, pruning, package="mean", dtype=torch.float32):
    model = from_timm(_pit(head_dim, dtype), pruning=pruning, package=package, **STAGES)
    torch.manual_seed(1)
    # Random selectors with a spread of scores, but not so wide that the dropped tokens' keep_prob (the
    # package weights) sink to ~1e-6, where float32 rounding of the probabilities moves the mean package row.
    with torch.no_grad():
        for p in model.selectors.parameters():
            p.normal_(std=0.2)
    if pruning == "threshold":
        calibrate_thresholds(model, _images(3, dtype, seed=7))
    return model


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("package", ["mean", "sum"])
@pytest.mark.parametrize("pruning", PRUNINGS)
def test_reference_matches_oracle(pruning, package):
    model = _model(48, pruning, package, torch.float64)
    images = _images(3, torch.float64)
    with torch.no_grad():
        logits, info = model(images, return_info=True)
    want, kept = pit_oracle_forward(model, images)
    assert _rel_err(logits, want) < 1e-9
    for s, (h, w) in enumerate(GRIDS):
        for b in range(3):
            assert torch.equal(info["kept_indices"][s][b], kept[s][b]), f"stage {s} image {b}: kept sets differ"
        total = int(info["num_kept"][s].sum())
        assert 0 < total < 3 * h * w, "the test must prune some tokens and keep some at every stage"
    assert info["grid_sizes"] == GRIDS
    assert torch.equal(info["num_tokens"], info["num_kept"] + 2)  # cls + kept + the one package row


def test_topk_keeps_ratio_of_each_stage_grid():
    model = _model(32, "topk")
    with torch.no_grad():
        _, info = model(_images(2), return_info=True)
    for s, (h, w) in enumerate(GRIDS):
        assert info["num_kept"][s].tolist() == [round(STAGES["keep_ratios"][s] * h * w)] * 2


@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_accelerated_matches_reference(head_dim, pruning):
    ref = _model(head_dim, pruning)
    acc = accelerate(copy.deepcopy(ref))
    assert isinstance(acc, AcceleratedPiT)
    images = _images(2)
    with torch.inference_mode():
        logits_ref, info_ref = ref(images, return_info=True)
        logits_acc, info_acc = acc(images, return_info=True)
        plain = acc(images)
    assert logits_acc.shape == (2, NUM_CLASSES)
    assert _rel_err(logits_acc, logits_ref) < ACC_TOL
    torch.testing.assert_close(plain, logits_acc, atol=0, rtol=0)
    for s in range(3):
        for b in range(2):
            assert torch.equal(info_acc["kept_indices"][s][b], info_ref["kept_indices"][s][b])
    for key in ("num_kept", "num_tokens"):
        assert torch.equal(info_acc[key], info_ref[key])
    assert info_acc["grid_sizes"] == info_ref["grid_sizes"]


def test_compile_fullgraph_topk_cpu():
    """Top-k PiT has no data-dependent size (the grid scatter included): one graph."""
    ref = _model(48, "topk")
    acc = accelerate(copy.deepcopy(ref))
    images = _images(2)
    compiled = torch.compile(acc, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(images)
        expect = ref(images)
    assert _rel_err(out, expect) < ACC_TOL


def test_autocast_bfloat16_cpu():
    ref = _model(48, "topk")
    check_autocast_bfloat16_cpu(ref, accelerate(copy.deepcopy(ref)), _images(4))


def test_stage_without_selector_runs_dense():
    """Selectors in stages 0 and 2 only: stage 1 runs dense (the package row passes through it)."""
    vit = _pit(48)
    ref = from_timm(vit, selector_layers=(1, 7), keep_ratios=(0.5, 0.5))
    acc = accelerate(copy.deepcopy(ref))
    images = _images(2, seed=3)
    with torch.inference_mode():
        got, want = acc(images), ref(images)
    assert _rel_err(got, want) < ACC_TOL
    with torch.no_grad():
        oracle, _ = pit_oracle_forward(ref, images)
    assert _rel_err(want, oracle) < 1e-4


@pytest.mark.parametrize("d", [48, 16, 64])
def test_padded_varlen_attention(d):
    """Zero padding of the head dim is exact: compare with a float64 softmax per image."""
    g = torch.Generator().manual_seed(d)
    lengths = [5, 1, 9]
    cu = make_cu_seqlens(lengths)
    q, k, v = (torch.randn(sum(lengths), 2, d, generator=g) for _ in range(3))
    scale = d ** -0.5
    out = padded_varlen_attention(q, k, v, cu, max(lengths), scale)
    assert out.shape == q.shape
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qi, ki, vi = (t[a:b].double().transpose(0, 1) for t in (q, k, v))
        want = torch.softmax(qi @ ki.transpose(1, 2) * scale, dim=-1) @ vi
        torch.testing.assert_close(out[a:b].double(), want.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_create_model_names():
    names = {"spvit_pit_ti", "spvit_pit_xs", "spvit_pit_s"}
    assert names <= set(list_models())
    model = create_model("spvit_pit_ti", num_classes=NUM_CLASSES, img_size=IMG)
    assert isinstance(model, SPViTPiT) and not model.training
    assert model.config.selector_layers == (1, 5, 10) and model.config.package_merge == "add"
    assert [sel.num_heads for sel in model.selectors] == [2, 4, 8]  # pit_ti: heads per stage
    with torch.inference_mode():
        assert model(_images(1)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("cfg, field", [
    (dict(package_merge="concat"), "package_merge"),
    (dict(selector_layers=(1, 3, 4), keep_ratios=(0.5, 0.5, 0.4)), "selector_layers"),  # two in stage 1
    (dict(selector_layers=(1, 2, 8), keep_ratios=(0.5, 0.5, 0.5)), "selector_layers"),  # stage 1's first block
    (dict(selector_layers=(1, 4, 9)), "selector_layers"),  # outside depth 9
    (dict(keep_ratios=(0.5, 1.5, 0.5)), "keep_ratios"),
    (dict(package="none"), "package_merge"),
    (dict(pruning="random"), "pruning"),
])
def test_bad_config(cfg, field):
    with pytest.raises(ValueError, match=field):
        from_timm(_pit(32), **{**STAGES, **cfg})


def test_distilled_pit_refused():
    from timm.models.pit import PoolingVisionTransformer

    vit = PoolingVisionTransformer(img_size=IMG, base_dims=(32,) * 3, depth=(2, 4, 3), heads=(2, 2, 4),
                                   distilled=True)
    with pytest.raises(ValueError, match="distilled"):
        from_timm(vit, **STAGES)


def test_visualize_pruning_pit(tmp_path):
    """python/visualize_pruning.py draws PiT's stages, each on its own grid (27x27, 14x14, 7x7 at 224 px)."""
    pytest.importorskip("matplotlib")
    from .test_examples import _load

    out = tmp_path / "pruning.png"
    kept = _load("visualize_pruning").main(["--model", "spvit_pit_ti", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert [len(k) for k in kept] == [round(r * n * n) for r, n in zip((0.617, 0.369, 0.137), (27, 14, 7))]
    assert max(kept[0]) < 27 * 27 and max(kept[2]) < 7 * 7


@requires_gpu
@pytest.mark.parametrize("dtype,tol,band", GPU_TOLS)
@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("name", ["spvit_pit_s", "spvit_pit_ti"])
def test_gpu_accelerated_matches_reference(name, pruning, dtype, tol, band):
    """On the GPU (Triton / CUDA ops) at 224 px: kept sets equal except for tokens within `band` of the
    decision boundary, logits of the images without such a flip within `tol`."""
    torch.manual_seed(0)
    ref = create_model(name, num_classes=NUM_CLASSES, pruning=pruning).to("cuda", dtype)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(9, 3, 224, 224, generator=g).to("cuda", dtype)
    if pruning == "threshold":
        calibrate_thresholds(ref, torch.randn(4, 3, 224, 224, generator=g).to("cuda", dtype))
    acc = accelerate(copy.deepcopy(ref))
    check_gpu_agreement(ref, acc, images, band, tol)


@requires_gpu
def test_gpu_topk_has_no_host_sync():
    """Top-k PiT, grid scatter and pooling included, never waits for the GPU."""
    torch.manual_seed(0)
    acc = accelerate(create_model("spvit_pit_s", num_classes=NUM_CLASSES).to("cuda", torch.bfloat16))
    images = torch.randn(4, 3, 224, 224).to("cuda", torch.bfloat16)
    assert_no_host_sync(acc, images)


def test_inference_only_batch_zero_and_image_shape():
    """The accelerated PiT goes through the same forward wrapper as every family: with autograd on its logits'
    backward raises (the fused ops have none), 0 images give 0 logits, wrong image shapes are named."""
    ref = _model(48, "topk")
    acc = accelerate(copy.deepcopy(ref))
    images = _images(2)
    with torch.no_grad():
        want = acc(images)
    logits = acc(images)
    torch.testing.assert_close(logits, want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="inference-only"):
        logits.sum().backward()
    with torch.no_grad():
        for model in (ref, acc):
            assert model(torch.zeros(0, 3, IMG, IMG)).shape == (0, NUM_CLASSES)
            with pytest.raises(ValueError, match=rf"images must have shape \(B, 3, {IMG}, {IMG}\)"):
                model(torch.zeros(1, 3, IMG + 8, IMG))
