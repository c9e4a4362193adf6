"""Tests of the LV-ViT family (spvit_kernels.models.lvvit, spvit_kernels.accelerate.lvvit).

- the backbone has the published checkpoints' parameter names and equals an independent functional forward
  written here from the published description (conv stem, skip_lam = 2, qkv without bias, MLP ratio 3,
  LayerNorm eps 1e-5, head(cls) + 0.5 * max over patches of aux_head);
- the masked SPViT model == the token-dropping oracle (float64; the aux max over the alive patches only);
- the accelerated model == the reference (CPU float32, exact kept sets), including an image with no patch left.
Tiny shapes (80 px: 25 patches, C 64, depth 4) keep the run short.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from spvit_kernels import accelerate
from spvit_kernels.models import calibrate_thresholds, create_model, from_timm
from spvit_kernels.models.lvvit import LVViT, SPViTLVViT, from_lvvit

from .model_oracle import assert_reference_matches_oracle, oracle_forward
from .test_accelerate import GPU_TOLS
from .test_accelerate import assert_no_host_sync, check_gpu_agreement
from .utils import requires_gpu

NUM_CLASSES = 5
P = 25
STAGES = dict(selector_layers=(1, 2, 3), keep_ratios=(0.7, 0.45, 0.2))
MERGES = [("concat", "mean"), ("add", "mean"), ("concat", "none")]
PRUNINGS = ["topk", "threshold"]
ACC_TOL = 1e-4  # logits relative to their largest magnitude, as test_accelerate on CPU float32


def _backbone(dtype=torch.float32, seed=0, depth=4):
    torch.manual_seed(seed)
    vit = LVViT(img_size=80, num_classes=NUM_CLASSES, embed_dim=64, depth=depth, num_heads=2)
    with torch.no_grad():  # non-trivial batch-norm statistics and biases, so that every term is exercised
        for name, t in vit.named_parameters():
            if name.endswith("bias") or "bn" in name:
                t.normal_(std=0.2)
        for m in vit.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(std=0.2)
                m.running_var.uniform_(0.5, 2.0)
    return vit.to(dtype).eval()


def _images(batch, dtype=torch.float32, seed=0, size=80):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(dtype)


def _expected_keys(depth):
    keys = ["cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias", "aux_head.weight",
            "aux_head.bias", "patch_embed.conv1.weight", "patch_embed.conv2.weight", "patch_embed.conv3.weight",
            "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for bn in ("bn1", "bn2", "bn3"):
        keys += [f"patch_embed.{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                    "num_batches_tracked")]
    for i in range(depth):
        keys += [f"blocks.{i}.{k}" for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight",
                                             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                                             "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return set(keys)


def _functional_lvvit(sd, images, num_heads, skip_lam=2.0):
    """LV-ViT's eval forward from a published-style state_dict, with plain functional ops."""
    def bn(x, name):
        return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], training=False, eps=1e-5)

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    x = F.relu(bn(F.conv2d(images, sd["patch_embed.conv1.weight"], stride=2, padding=3), "patch_embed.bn1"))
    x = F.relu(bn(F.conv2d(x, sd["patch_embed.conv2.weight"], padding=1), "patch_embed.bn2"))
    x = F.relu(bn(F.conv2d(x, sd["patch_embed.conv3.weight"], padding=1), "patch_embed.bn3"))
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    B, _, C = x.shape
    x = torch.cat([sd["cls_token"].expand(B, 1, C), x], dim=1) + sd["pos_embed"]
    d = C // num_heads
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        q, k, v = F.linear(ln(x, p + "norm1"), sd[p + "attn.qkv.weight"]).view(B, -1, 3, num_heads, d).permute(
            2, 0, 3, 1, 4)
        a = torch.softmax((q * d ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, C), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + a / skip_lam
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]) / skip_lam
        i += 1
    x = ln(x, "norm")
    cls = F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])
    return cls + 0.5 * F.linear(x[:, 1:], sd["aux_head.weight"], sd["aux_head.bias"]).amax(dim=1)


def test_backbone_names_and_published_forward():
    vit = _backbone(torch.float64)
    sd = vit.state_dict()
    assert set(sd) == _expected_keys(4)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (192, 64)  # MLP ratio 3
    assert sd["patch_embed.conv1.weight"].shape == (64, 3, 7, 7)
    images = _images(2, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), _functional_lvvit(sd, images, num_heads=2), atol=1e-10, rtol=1e-10)
    # a published-style checkpoint (plain backbone keys) loads into the SPViT model's backbone
    model = from_lvvit(_backbone(torch.float64, seed=1), **STAGES)
    model.vit.load_state_dict(sd)
    assert all(torch.equal(model.state_dict()["vit." + k], v) for k, v in sd.items())


def _model(pruning, merge, package, dtype):
    model = from_lvvit(_backbone(dtype), pruning=pruning, package=package, package_merge=merge, **STAGES)
    if pruning == "threshold":
        calibrate_thresholds(model, _images(3, dtype, seed=7))
    return model


def test_nothing_pruned_equals_backbone():
    vit = _backbone()
    images = _images(2, seed=2)
    with torch.no_grad():
        dense = vit(images)
        model = from_lvvit(vit, keep_ratios=(1.0,), selector_layers=(2,), package="none")
        torch.testing.assert_close(model(images), dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(accelerate(copy.deepcopy(model))(images), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merge,package", MERGES)
@pytest.mark.parametrize("pruning", PRUNINGS)
def test_reference_equals_token_dropping(pruning, merge, package):
    model = _model(pruning, merge, package, torch.float64)
    info = assert_reference_matches_oracle(model, _images(3, torch.float64))
    assert 0 < int(info["num_kept"][0].sum()) < 3 * P, "the test must prune some tokens and keep some"


@pytest.mark.parametrize("merge,package", MERGES)
@pytest.mark.parametrize("pruning", PRUNINGS)
def test_accelerated_equals_reference(pruning, merge, package):
    ref = _model(pruning, merge, package, torch.float32)
    acc = accelerate(copy.deepcopy(ref))
    assert isinstance(acc, SPViTLVViT) and type(acc).__name__ == "AcceleratedLVViT"
    images = _images(3, seed=1)
    with torch.inference_mode():
        logits_ref, info_ref = ref(images, return_info=True)
        logits_acc, info_acc = acc(images, return_info=True)
    assert ((logits_acc - logits_ref).abs().max() / logits_ref.abs().max()).item() < ACC_TOL
    for s in range(3):
        for b in range(3):
            assert torch.equal(info_acc["kept_indices"][s][b], info_ref["kept_indices"][s][b])
    assert torch.equal(info_acc["num_tokens"], info_ref["num_tokens"])


def test_no_patch_left_drops_the_aux_term():
    """Threshold +inf drops every patch at the first stage: logits = head(norm(cls)) in every form."""
    model = from_lvvit(_backbone(), pruning="threshold", threshold=float("inf"), **STAGES)
    images = _images(2, seed=3)
    with torch.inference_mode():
        logits, info = model(images, return_info=True)
        logits_acc = accelerate(copy.deepcopy(model))(images)
        oracle, _, _, _ = oracle_forward(model, images)
    assert info["num_kept"].sum() == 0
    torch.testing.assert_close(logits, oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_acc, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,dim,depth,heads,layers", [("spvit_lvvit_s", 384, 16, 6, (4, 8, 12)),
                                                         ("spvit_lvvit_m", 512, 20, 8, (5, 10, 15))])
def test_create_model(name, dim, depth, heads, layers):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, img_size=64, package_merge="add")
    assert isinstance(model, SPViTLVViT)
    assert (model.embed_dim, len(model.vit.blocks), model.num_heads) == (dim, depth, heads)
    assert model.config.selector_layers == layers
    assert set(model.vit.state_dict()) == _expected_keys(depth)
    with torch.inference_mode():
        logits, info = model(_images(2, size=64), return_info=True)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert info["num_kept"].tolist() == [[10, 10], [6, 6], [2, 2]]  # round(r * 16)


def test_bad_arguments():
    with pytest.raises(TypeError, match="vit"):
        from_lvvit(torch.nn.Linear(3, 3), **STAGES)
    with pytest.raises(ValueError, match="selector_layers"):
        create_model("spvit_lvvit_s", selector_layers=(4, 8, 16))
    with pytest.raises(ValueError, match="package_merge"):
        from_lvvit(_backbone(), package_merge="stack", **STAGES)
    with pytest.raises(TypeError, match="vit"):
        from_timm(_backbone())
    with pytest.raises(ValueError, match="img_size"):
        LVViT(img_size=70)


def test_compile_fullgraph_topk_cpu():
    """Top-k needs no host synchronisation, the aux segment max included: torch.compile traces it whole."""
    acc = accelerate(from_lvvit(_backbone(), **STAGES))
    images = _images(2, seed=4)
    with torch.inference_mode():
        out = torch.compile(acc, fullgraph=True)(images)
        expect = acc(images)
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


@requires_gpu
@pytest.mark.parametrize("dtype,tol,band", GPU_TOLS)
@pytest.mark.parametrize("pruning", PRUNINGS)
def test_gpu_accelerated_matches_reference(pruning, dtype, tol, band):
    torch.manual_seed(0)
    ref = create_model("spvit_lvvit_s", num_classes=NUM_CLASSES, pruning=pruning, package_merge="add")
    ref = ref.to("cuda", dtype)
    if pruning == "threshold":
        calibrate_thresholds(ref, _images(4, dtype, seed=9, size=224).cuda())
    acc = accelerate(copy.deepcopy(ref))
    images = _images(9, dtype, seed=3, size=224).cuda()
    check_gpu_agreement(ref, acc, images, band, tol, same_tokens=False)


@requires_gpu
def test_gpu_topk_has_no_host_sync():
    torch.manual_seed(0)
    acc = accelerate(create_model("spvit_lvvit_s", num_classes=NUM_CLASSES).to("cuda", torch.bfloat16))
    images = _images(4, torch.bfloat16, size=224).cuda()
    assert_no_host_sync(acc, images)


def test_image_shape_and_batch_zero():
    """LV-ViT's conv stem fixes the image size (its position embedding has one grid): other sizes are named."""
    ref = _model("topk", "concat", "mean", torch.float32)
    acc = accelerate(copy.deepcopy(ref))
    with torch.no_grad():
        for model in (ref, acc):
            assert model(torch.zeros(0, 3, 80, 80)).shape == (0, NUM_CLASSES)
            with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 80, 80\)"):
                model(torch.zeros(1, 3, 96, 96))
