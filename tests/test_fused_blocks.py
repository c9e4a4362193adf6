"""The training forward's fused blocks (policy_blocks_forward): residual adds fused into the LayerNorms that read
them (models/add_norm.py) and GELU into the MLP's fc2 (models/fused_mlp.py). On CPU the carried-residual loop is
bitwise the block-by-block one; through torch.ops.spvit.add_layer_norm and gelu_mlp (Triton under
TRITON_INTERPRET=1, or the reference backends) the training forward, the teacher's and every parameter's gradient
agree with it."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from spvit_kernels import ops
from spvit_kernels.models import add_norm as add_norm_mod
from spvit_kernels.models import fused_mlp
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


def _segment(drop_path, images):
    """A 4-block timm ViT in train mode on (images, 65, 64) tokens with a keep policy: (blocks, params, the block
    loop's output and gradients, a function running the carried loop with the block loop's random draws)."""
    vit = _tiny_vit(drop_path_rate=drop_path).train()
    x = torch.randn(images, 65, 64, requires_grad=True)
    policy = (torch.rand(images, 65) < 0.6).float().requires_grad_()
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
    return params, want, want_g, lambda: _grads(carried, params)


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_carried_loop_is_bitwise_the_block_loop(drop_path):
    _, want, want_g, carried = _segment(drop_path, 3)
    (got,), got_g = carried()
    assert torch.equal(got, want)
    for a, b in zip(got_g, want_g):
        assert torch.equal(a, b)


@pytest.mark.parametrize("drop_path", [0.0, 0.6])
def test_carried_loop_through_the_op(drop_path, monkeypatch):
    """One 4-block segment through the op (reference backend): each norm1 takes the previous block's MLP branch
    with its drop path, each norm2 the attention branch with its own; the same as the block loop (same draws)."""
    _, want, want_g, carried = _segment(drop_path, 5)
    _through_op(monkeypatch, "reference", [])
    (got,), got_g = carried()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _through_op(monkeypatch, backend, calls, mlp_calls=None):
    """Route every LayerNorm through add_layer_norm and every plain GELU MLP through gelu_mlp, on any device."""
    def norm_backend(norm, x):
        if isinstance(norm, torch.nn.LayerNorm):
            calls.append(norm)
            return backend
        return None

    def mlp_backend(mlp, h):
        if fused_mlp.is_plain_gelu_mlp(mlp):
            (mlp_calls if mlp_calls is not None else []).append(mlp)
            return backend
        return None

    monkeypatch.setattr(add_norm_mod, "fused_backend", norm_backend)
    monkeypatch.setattr(fused_mlp, "fused_backend", mlp_backend)


def _train_outputs(model, images, noise):
    def fn():
        out = model(images, gumbel_noise=noise)
        return [out.logits, out.tokens]

    return _grads(fn, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_training_forward_through_the_op(backend, drop_path, monkeypatch):
    """The training forward through the fused ops equals the PyTorch blocks; with stochastic depth the op scales
    each branch by the mask timm's DropPath would have drawn (same random stream: the same images dropped)."""
    torch.manual_seed(0)
    model = from_timm(_tiny_vit(drop_path_rate=drop_path), selector_layers=(1, 2, 3)).train()
    images = torch.randn(4, 3, 32, 32)
    noise = [0.3 * torch.randn(4, 64, 2) + torch.tensor([0.5, 0.0]) for _ in range(3)]
    torch.manual_seed(5)
    want_out, want_g = _train_outputs(model, images, noise)
    calls, mlp_calls = [], []
    _through_op(monkeypatch, backend, calls, mlp_calls)
    scaled, op = [], ops.add_layer_norm  # add_norm imports the op at each call: count the calls with a scale
    monkeypatch.setattr(ops, "add_layer_norm", lambda *a, **k: scaled.append(a[6] is not None) or op(*a, **k))
    torch.manual_seed(5)
    got_out, got_g = _train_outputs(model, images, noise)
    # every add of a dropped-path branch carries its scale: four one-block segments (selectors before blocks 1-3),
    # so one branch through the op per block (norm2's; the MLP branch ends the segment), and block 0's rate is 0
    assert sum(scaled) == (3 if drop_path else 0)
    assert len(calls) == 2 * len(model.vit.blocks)  # both norms of every block
    assert len(mlp_calls) == len(model.vit.blocks)
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


def test_fused_backends_only_on_cuda():
    norm = torch.nn.LayerNorm(8)
    assert add_norm_mod.fused_backend(norm, torch.zeros(2, 8)) is None  # CPU: the PyTorch calls
    assert add_norm_mod.fused_backend(torch.nn.Identity(), torch.zeros(2, 8)) is None
    assert fused_mlp.fused_backend(_tiny_vit().blocks[0].mlp, torch.zeros(2, 64)) is None


def test_plain_gelu_mlp():
    """Only fc1 -> exact GELU -> fc2 with nothing else acting is fused: not the tanh GELU, an active dropout,
    a norm between the linears, or another activation."""
    from timm.layers import Mlp

    assert fused_mlp.is_plain_gelu_mlp(Mlp(8, 32))
    assert fused_mlp.is_plain_gelu_mlp(Mlp(8, 32, drop=0.1).eval())
    assert not fused_mlp.is_plain_gelu_mlp(Mlp(8, 32, drop=0.1).train())
    assert not fused_mlp.is_plain_gelu_mlp(Mlp(8, 32, act_layer=lambda: torch.nn.GELU(approximate="tanh")))
    assert not fused_mlp.is_plain_gelu_mlp(Mlp(8, 32, act_layer=torch.nn.ReLU))
    assert not fused_mlp.is_plain_gelu_mlp(Mlp(8, 32, norm_layer=torch.nn.LayerNorm))
    assert not fused_mlp.is_plain_gelu_mlp(torch.nn.Linear(8, 8))


@requires_gpu
def test_gpu_training_forward_uses_the_fused_ops(monkeypatch):
    """On a GPU, under bf16 autocast, the training forward's norms and MLPs go through the ops and agree with the CPU
    float32 form to bf16 accuracy."""
    from spvit_kernels import ops

    calls, mlp_calls = [], []
    real, real_mlp = ops.add_layer_norm, ops.gelu_mlp
    monkeypatch.setattr("spvit_kernels.ops.add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("spvit_kernels.ops.gelu_mlp", lambda *a, **k: mlp_calls.append(1) or real_mlp(*a, **k))
    torch.manual_seed(0)
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3)).train()
    images = torch.randn(2, 3, 32, 32)
    noise = [torch.zeros(1, 1, 2)] * 3
    cpu = model(images, gumbel_noise=noise).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = model.cuda()(images.cuda(), gumbel_noise=[n.cuda() for n in noise]).logits
    assert calls and mlp_calls
    torch.testing.assert_close(gpu.float().cpu(), cpu, atol=5e-2, rtol=5e-2)


def _lvvit_teacher():
    from spvit_kernels.models.lvvit import LVViT

    teacher = LVViT(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=3, num_heads=2).eval()
    with torch.no_grad():
        for p in teacher.parameters():  # off the (1, 0) LayerNorm init and the zero biases
            p.add_(0.1 * torch.randn_like(p))
    return teacher


@pytest.mark.parametrize("family", ["vit", "lvvit"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_teacher_features_through_the_op(backend, family, monkeypatch):
    """The dense teacher's forward with the fused norms (the last residual add into the final norm) gives its
    unfused forward (timm's forward_features; an LVViT's blocks, whose branches are divided by skip_lam, and norm
    one by one)."""
    from spvit_kernels.training import teacher_outputs

    torch.manual_seed(0)
    teacher = _tiny_vit().eval() if family == "vit" else _lvvit_teacher()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = teacher_outputs(teacher, images)
        calls, mlp_calls = [], []
        _through_op(monkeypatch, backend, calls, mlp_calls)
        got = teacher_outputs(teacher, images)
    assert len(calls) >= 2 * len(teacher.blocks) + 1 and len(mlp_calls) == len(teacher.blocks)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_fused_kernels_switch():
    from spvit_kernels import _fusion
    from spvit_kernels.training import fused_kernels

    assert _fusion.fused_kernels_enabled()
    with fused_kernels(False):
        assert not _fusion.fused_kernels_enabled()
        with fused_kernels(True):
            assert _fusion.fused_kernels_enabled()
        assert not _fusion.fused_kernels_enabled()
    with pytest.raises(RuntimeError), fused_kernels(False):
        raise RuntimeError("restored on the way out")
    assert _fusion.fused_kernels_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"), fused_kernels(0):
        pass


@requires_gpu
def test_gpu_fused_kernels_off_runs_the_pytorch_forms(monkeypatch):
    from spvit_kernels import ops
    from spvit_kernels.training import fused_kernels

    calls = []
    for name in ("add_layer_norm", "gelu_mlp", "policy_attention", "selector_train"):
        real = getattr(ops, name)
        monkeypatch.setattr(f"spvit_kernels.ops.{name}", lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    model = from_timm(_tiny_vit(), selector_layers=(1, 2, 3)).train().cuda()
    with fused_kernels(False):
        model(torch.randn(2, 3, 32, 32, device="cuda"))
    assert not calls


@pytest.mark.parametrize("name", ["spvit_lvvit_s", "spvit_pit_ti"])
def test_frozen_families_through_the_ops(name, monkeypatch):
    """LV-ViT and PiT (a dropped row keeps its value, block by block) use the fused norms and MLPs inside each
    block: the training forward and every gradient agree with the PyTorch form."""
    from spvit_kernels.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=5).train()
    for m in model.modules():  # train-mode BatchNorm (LV-ViT's stem) would see two different batches' statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    images = torch.randn(1, 3, 224, 224)
    torch.manual_seed(1)  # the same Gumbel noise in both runs
    want_out, want_g = _train_outputs(model, images, None)
    calls, mlp_calls = [], []
    _through_op(monkeypatch, "reference", calls, mlp_calls)
    torch.manual_seed(1)
    got_out, got_g = _train_outputs(model, images, None)
    assert calls and mlp_calls
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_training_step_through_every_fused_kernel(monkeypatch):
    """The GPU training path composed, on the CPU: policy_attention, selector_train, add_layer_norm and gelu_mlp
    all on their Triton kernels (interpreted), in one training forward + backward of a small SPViT, against the
    PyTorch forms (logits, tokens and every parameter's gradient)."""
    import importlib

    from spvit_kernels.models.selector import TokenSelector
    from spvit_kernels.ops import _registry

    pa = importlib.import_module("spvit_kernels.training.policy_attention")  # the module, not its function

    torch.manual_seed(0)
    model = from_timm(_tiny_vit(img_size=16, depth=3), selector_layers=(1, 2), keep_ratios=(0.7, 0.5)).train()
    images = torch.randn(2, 3, 16, 16)
    noise = [0.3 * torch.randn(2, 16, 2) + torch.tensor([0.5, 0.0]) for _ in range(2)]
    want_out, want_g = _train_outputs(model, images, noise)
    for op in ("policy_attention", "policy_attention_backward", "selector_train", "selector_train_backward"):
        monkeypatch.setitem(_registry.DEFAULT_ORDER[op], "cpu", ("triton", "reference"))
    monkeypatch.setattr(pa, "_use_op", lambda q: True)
    monkeypatch.setattr(TokenSelector, "_use_train_op", lambda self, S: True)
    _through_op(monkeypatch, "triton", [], [])
    ran = set()
    for op in ("policy_attention", "selector_train", "add_layer_norm", "gelu_mlp"):
        mod = importlib.import_module(f"spvit_kernels.triton.{op}")
        for half in ("fwd", "bwd"):
            name = f"{op}_{half}_triton"
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _n=name, _r=real: ran.add(_n) or _r(*a))
    got_out, got_g = _train_outputs(model, images, noise)
    assert len(ran) == 8, sorted(ran)  # every fused kernel's forward and backward ran
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-4)
