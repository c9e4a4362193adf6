"""Tests of the DeiT-family variants: prefix rows (distillation token, register tokens, no class token with
global_pool='avg') and the 1x package mode (package_merge="add").

For every variant: the masked reference == the independent token-dropping oracle (float64, exact kept sets),
the accelerated model == the reference (CPU float32, exact kept sets, logits within the tolerance of
test_accelerate), and with nothing pruned both == timm's own forward (so the heads read what timm reads).
Small ViTs (40 px, patch 8: 25 patches, depth 4) keep the run short.
"""

import copy

import pytest
import torch

from spvit_kernels import accelerate
from spvit_kernels.models import calibrate_thresholds, create_model, from_timm

from .model_oracle import assert_reference_matches_oracle
from .test_accelerate import GPU_TOLS
from .test_accelerate import check_gpu_agreement
from .utils import requires_gpu

NUM_CLASSES = 5
P = 25  # patches of the small ViT
STAGES = dict(selector_layers=(1, 2, 3), keep_ratios=(0.7, 0.45, 0.2))
# timm ViT arguments of each variant -> expected prefix rows
VARIANTS = {
    "cls": (dict(), 1),
    "distilled": (dict(distilled=True), 2),
    "registers": (dict(reg_tokens=3), 4),
    "avg_no_cls": (dict(class_token=False, global_pool="avg"), 0),
    "avg_cls_row_norm": (dict(global_pool="avg", fc_norm=False), 1),  # final LayerNorm row-wise, then the mean
}
MERGES = [("concat", "mean"), ("add", "mean"), ("add", "sum")]
PRUNINGS = ["topk", "threshold"]
ACC_TOL = 1e-4  # logits, relative to their largest magnitude (test_accelerate's CPU float32 tolerance)


def _vit(variant, dtype=torch.float32, seed=0):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(VARIANTS[variant][0])
    cls = VisionTransformerDistilled if kw.pop("distilled", False) else VisionTransformer
    torch.manual_seed(seed)
    vit = cls(img_size=40, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=NUM_CLASSES, **kw)
    with torch.no_grad():  # timm zero-initialises some prefix tokens: give them values that matter
        for name in ("cls_token", "dist_token", "reg_token"):
            if getattr(vit, name, None) is not None:
                getattr(vit, name).normal_(std=0.5)
    return vit.to(dtype).eval()


def _images(batch, dtype=torch.float32, seed=0, size=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(dtype)


def _model(variant, pruning, merge, package, dtype):
    model = from_timm(_vit(variant, dtype), pruning=pruning, package=package, package_merge=merge, **STAGES)
    if pruning == "threshold":  # per-stage thresholds from other images: some tokens kept, some dropped
        calibrate_thresholds(model, _images(3, dtype, seed=7))
    return model


def _packages(merge, stage):
    return 1 if merge == "add" else stage + 1


@pytest.mark.parametrize("merge,package", MERGES)
@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_equals_token_dropping(variant, pruning, merge, package):
    model = _model(variant, pruning, merge, package, torch.float64)
    assert model.num_prefix == VARIANTS[variant][1]
    info = assert_reference_matches_oracle(model, _images(3, torch.float64))
    for s in range(3):
        expected = model.num_prefix + info["num_kept"][s] + _packages(merge, s)
        assert torch.equal(info["num_tokens"][s], expected)
    kept = int(info["num_kept"][0].sum())
    assert 0 < kept < 3 * P, "the test must prune some tokens and keep some"


@pytest.mark.parametrize("merge,package", MERGES)
@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_accelerated_equals_reference(variant, pruning, merge, package):
    ref = _model(variant, pruning, merge, package, torch.float32)
    acc = accelerate(copy.deepcopy(ref))
    images = _images(3, seed=1)
    with torch.inference_mode():
        logits_ref, info_ref = ref(images, return_info=True)
        logits_acc, info_acc = acc(images, return_info=True)
    scale = logits_ref.abs().max().clamp(min=1e-6)
    assert ((logits_acc - logits_ref).abs().max() / scale).item() < ACC_TOL
    for s in range(3):
        for b in range(3):
            assert torch.equal(info_acc["kept_indices"][s][b], info_ref["kept_indices"][s][b]), \
                f"stage {s} image {b}: kept sets differ"
    assert torch.equal(info_acc["num_tokens"], info_ref["num_tokens"])
    assert torch.equal(info_acc["num_kept"], info_ref["num_kept"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nothing_pruned_equals_timm(variant):
    """keep ratio 1 and no package token: the reference and the accelerated model are timm's forward."""
    vit = _vit(variant)
    images = _images(2, seed=2)
    with torch.no_grad():
        dense = vit(images)
        model = from_timm(vit, keep_ratios=(1.0,), selector_layers=(2,), package="none")
        out = model(images)
        out_acc = accelerate(copy.deepcopy(model))(images)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_acc, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_create_model_distilled(size):
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = create_model(f"spvit_deit_{size}_distilled", num_classes=3, img_size=64, package_merge="add")
    assert isinstance(model.vit, VisionTransformerDistilled) and model.num_prefix == 2
    images = _images(2, size=64)
    with torch.inference_mode():
        logits, info = model(images, return_info=True)
        logits_acc, info_acc = accelerate(copy.deepcopy(model))(images, return_info=True)
    assert logits.shape == (2, 3)
    assert info["num_kept"].tolist() == [[10, 10], [6, 6], [2, 2]]  # round(r * 16)
    assert info["num_tokens"].tolist() == [[13, 13], [9, 9], [5, 5]]  # 2 prefix + kept + 1 package row
    assert torch.equal(info_acc["num_tokens"], info["num_tokens"])
    assert ((logits_acc - logits).abs().max() / logits.abs().max()).item() < ACC_TOL


@requires_gpu
@pytest.mark.parametrize("dtype,tol,band", GPU_TOLS)
@pytest.mark.parametrize("merge,package", MERGES[:2])
@pytest.mark.parametrize("variant", ["distilled", "registers", "avg_no_cls"])
def test_gpu_accelerated_matches_reference(variant, merge, package, dtype, tol, band):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kw = dict(VARIANTS[variant][0])
    if kw.pop("distilled", False):
        ref = create_model("spvit_deit_small_distilled", num_classes=NUM_CLASSES, package_merge=merge,
                           package=package)
    else:
        vit = VisionTransformer(embed_dim=384, num_heads=6, num_classes=NUM_CLASSES, **kw)
        ref = from_timm(vit, package_merge=merge, package=package)
    ref = ref.to("cuda", dtype)
    acc = accelerate(copy.deepcopy(ref))
    images = _images(9, dtype, seed=3, size=224).cuda()
    check_gpu_agreement(ref, acc, images, band, tol)
