"""The training-step benchmark's paper form (benchmarks/paper_form.py) computes what the library's training form
computes: same logits, decisions, loss and gradients, and less saved memory for ours."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_train_step  # noqa: E402


@pytest.mark.parametrize("name", ["spvit_deit_tiny", "spvit_deit_small"])
def test_paper_form_agrees_with_ours(name):
    assert bench_train_step.check_agreement(name, 2, img_size=32, patch_size=4, num_classes=5)


def test_ours_saves_less_for_backward():
    model, loss_fn = bench_train_step.build("spvit_deit_tiny", img_size=64, patch_size=4, num_classes=5)
    images, targets = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    paper = bench_train_step.saved_bytes(model, loss_fn, images, targets, "paper_form")
    ours = bench_train_step.saved_bytes(model, loss_fn, images, targets, "ours")
    assert 0 < ours < paper


def test_paper_teacher_attention():
    """Within paper_form() timm's Attention.forward is the paper code's teacher form (float32 q, k, v, scores
    materialised), equal to timm's own forward up to rounding; outside it, timm's forward again."""
    from timm.models.vision_transformer import Attention

    import paper_form

    torch.manual_seed(0)
    attn = Attention(48, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(2, 13, 48)
    want = attn(x)
    timm_forward = Attention.forward
    with paper_form.paper_form():
        assert Attention.forward is paper_form.paper_teacher_attention
        got = attn(x)
    assert Attention.forward is timm_forward
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # its own scores, not timm's SDPA call: it reads attn.scale (as the paper code's Attention), which SDPA ignores
    attn.scale = attn.scale * 2
    assert (paper_form.paper_teacher_attention(attn, x) - want).abs().max() > 1e-3
