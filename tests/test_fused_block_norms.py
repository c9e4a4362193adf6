"""The training forward's residual adds fused into the LayerNorms that read them (models/add_norm.py,
policy_blocks_forward): on CPU the carried-residual loop is bitwise the block-by-block one; through
torch.ops.spvit.add_layer_norm (Triton under TRITON_INTERPRET=1, or the reference backend) the training forward
and every parameter's gradient agree with it."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from spvit_kernels.models import add_norm as add_norm_mod
from spvit_kernels.models import from_timm
from spvit_kernels.models.train_forward import policy_block_forward, policy_blocks_forward

from .utils import requires_gpu, requires_triton_interpret


def _tiny_vit(**kw):
    args = dict(img_size=32, patch_size=4, num_classes=5, embed_dim=64, depth=4, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args)


def _grads(fn, params):
    out = fn()
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in out)
    return [o.detach() for o in out], torch.autograd.grad(loss, params)


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_carried_loop_is_bitwise_the_block_loop(drop_path):
    vit = _tiny_vit(drop_path_rate=drop_path).train()
    x = torch.randn(3, 65, 64, requires_grad=True)
    policy = (torch.rand(3, 65) < 0.6).float().requires_grad_()
    params = [x, policy] + list(vit.blocks.parameters())

    def block_loop():
        torch.manual_seed(7)
        y = x
        for block in vit.blocks:
            y = policy_block_forward(block, y, policy, 1e-6)
        return [y]

    def carried():
        torch.manual_seed(7)
        return [policy_blocks_forward(vit.blocks, x, policy, 1e-6)]

    (want,), want_g = _grads(block_loop, params)
    (got,), got_g = _grads(carried, params)
    assert torch.equal(got, want)
    for a, b in zip(got_g, want_g):
        assert torch.equal(a, b)


def _through_op(monkeypatch, backend, calls):
    def fused_backend(norm, x):
        if isinstance(norm, torch.nn.LayerNorm):
            calls.append(norm)
            return backend
        return None

    monkeypatch.setattr(add_norm_mod, "fused_backend", fused_backend)


def _train_outputs(model, images, noise):
    def fn():
        out = model(images, gumbel_noise=noise)
        return [out.logits, out.tokens]

    return _grads(fn, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_training_forward_through_the_op(backend, monkeypatch):
    torch.manual_seed(0)
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3)).train()
    images = torch.randn(2, 3, 32, 32)
    noise = [0.3 * torch.randn(2, 64, 2) + torch.tensor([0.5, 0.0]) for _ in range(3)]
    want_out, want_g = _train_outputs(model, images, noise)
    calls = []
    _through_op(monkeypatch, backend, calls)
    got_out, got_g = _train_outputs(model, images, noise)
    assert len(calls) == 2 * len(model.vit.blocks)  # both norms of every block
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_compiled_training_forward_through_the_op(monkeypatch):
    """torch.compile(fullgraph=True) of the training forward with the fused norms: the graph holds the op."""
    torch.manual_seed(0)
    model = from_timm(_tiny_vit(depth=2), selector_layers=(1,), keep_ratios=(0.7,)).train()
    images = torch.randn(2, 3, 32, 32)
    noise = [torch.zeros(1, 1, 2)]
    want = model(images, gumbel_noise=noise).logits
    _through_op(monkeypatch, "reference", [])
    got = torch.compile(lambda im: model(im, gumbel_noise=noise).logits, fullgraph=True, backend="aot_eager")(images)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_fused_backend_only_on_cuda_layer_norms():
    norm = torch.nn.LayerNorm(8)
    assert add_norm_mod.fused_backend(norm, torch.zeros(2, 8)) is None  # CPU: the PyTorch calls
    assert add_norm_mod.fused_backend(torch.nn.Identity(), torch.zeros(2, 8)) is None


@requires_gpu
def test_gpu_training_forward_uses_the_fused_norms(monkeypatch):
    """On a GPU, under bf16 autocast, the training forward's norms go through the op and agree with the CPU
    float32 form to bf16 accuracy."""
    from spvit_kernels import ops

    calls = []
    real = ops.add_layer_norm
    monkeypatch.setattr("spvit_kernels.ops.add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3)).train()
    images = torch.randn(2, 3, 32, 32)
    noise = [torch.zeros(1, 1, 2)] * 3
    cpu = model(images, gumbel_noise=noise).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = model.cuda()(images.cuda(), gumbel_noise=[n.cuda() for n in noise]).logits
    assert calls
    torch.testing.assert_close(gpu.float().cpu(), cpu, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_teacher_features_through_the_op(backend, monkeypatch):
    """The dense teacher's forward with the fused norms (the last residual add into the final norm) gives timm's
    forward_features."""
    from spvit_kernels.training import teacher_outputs

    torch.manual_seed(0)
    teacher = _tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = teacher_outputs(teacher, images)
        calls = []
        _through_op(monkeypatch, backend, calls)
        got = teacher_outputs(teacher, images)
    assert len(calls) >= 2 * len(teacher.blocks) + 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
