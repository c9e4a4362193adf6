"""benchmarks/flops.py, the FLOP ceiling of throughput.py: its counts equal the closed forms of a ViT.

A block on N tokens of width C (MLP ratio 4) costs 24 N C^2 (qkv, proj, fc1, fc2) + 4 N^2 C (QK^T, PV) FLOPs.
Dense: every block on 1 + P tokens. Accelerated (top-k): the blocks after a selector run on the tokens each
image still carries, plus the selectors' own linears and the package pooling.
"""

import os
import sys

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from spvit_kernels import accelerate
from spvit_kernels.models import from_timm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from flops import forward_gflops  # noqa: E402

C, H, DEPTH, PATCH, IMG, CLASSES = 64, 2, 4, 8, 40, 10
P = (IMG // PATCH) ** 2  # 25 patches


def _block_flops(n):
    return 24 * n * C * C + 4 * n * n * C


def _selector_flops(rows):
    d = C // H
    per_head = 2 * (d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2)
    return rows * (H * per_head + 4 * H * (H // 2))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=C, depth=DEPTH, num_heads=H,
                            num_classes=CLASSES).eval()
    model = from_timm(vit, pruning="topk", selector_layers=(1, 2, 3), keep_ratios=(0.6, 0.36, 0.12)).eval()
    return vit, model


@pytest.mark.parametrize("batch", [1, 3])
def test_dense_count_is_the_closed_form(models, batch):
    vit, _ = models
    images = torch.randn(batch, 3, IMG, IMG)
    stem = 2 * P * C * 3 * PATCH * PATCH
    head = 2 * C * CLASSES
    expected = batch * (stem + DEPTH * _block_flops(1 + P) + head)
    assert forward_gflops(lambda: vit(images), vit) * 1e9 == pytest.approx(expected, rel=1e-9)


def test_accelerated_count_follows_the_kept_tokens(models):
    vit, model = models
    fast = accelerate(model)
    images = torch.randn(2, 3, IMG, IMG)
    with torch.inference_mode():
        info = fast(images, return_info=True)[1]
    tokens = [1 + P] + [int(n) for n in info["num_tokens"][:, 0]]  # top-k: every image carries the same count
    kept = [P] + [int(n) for n in info["num_kept"][:, 0]]
    stem, head = 2 * P * C * 3 * PATCH * PATCH, 2 * C * CLASSES
    per_image = stem + head + _block_flops(tokens[0])
    for s in range(3):
        per_image += _selector_flops(tokens[s]) + 2 * (kept[s] - kept[s + 1]) * C + _block_flops(tokens[s + 1])
    counted = forward_gflops(lambda: fast(images), fast) * 1e9
    assert counted == pytest.approx(2 * per_image, rel=1e-9)
    dense = forward_gflops(lambda: vit(images), vit) * 1e9
    assert dense / counted > 1.3  # the pruned forward really does less work
