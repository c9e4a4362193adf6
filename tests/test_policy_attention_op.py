"""torch.ops.spvit.policy_attention (SPViT's training attention): every backend, forward and all gradients (the
policy's included), against the paper code's formula in float64; opcheck; torch.compile.

The float64 oracle is the eye-matrix form of the paper code with the row max detached (the op's gradient treats
it as a constant). Triton runs under TRITON_INTERPRET=1 without a GPU (kept to small shapes: the interpreter
runs each program as numpy)."""

import pytest
import torch

from spvit_kernels import ops
from spvit_kernels.reference.policy_attention import policy_attention_eye

from .utils import requires_gpu, requires_triton_interpret

# (B, N, H, d): ViT-like odd lengths; d 32 / 64 (DeiT, PiT-Ti) and 48 / 80 (padded head dims).
SHAPES = [(2, 31, 3, 64), (1, 197, 2, 32), (2, 1, 2, 64), (2, 75, 2, 48), (1, 123, 1, 80)]
POLICIES = ["ones", "zeros", "binary", "soft"]
EPS = [0.0, 1e-6]
# dtype -> (atol, rtol) against the float64 oracle, on values of order 1.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}


def _policy(kind, B, N, g):
    if kind == "ones":
        return torch.ones(B, N)
    if kind == "zeros":
        return torch.zeros(B, N)
    if kind == "binary":
        return (torch.rand(B, N, generator=g) < 0.5).float()
    return torch.rand(B, N, generator=g)


def _inputs(B, N, H, d, dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(dtype)  # q, k, v: strided views of one packed tensor
    return qkv, _policy(kind, B, N, g), torch.randn(B, N, H, d, generator=g).to(dtype)


def _oracle(qkv, policy, dout, eps):
    qkv64 = qkv.detach().double().requires_grad_()
    p64 = policy.detach().double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv64.unbind(2))
    out = policy_attention_eye(q, k, v, p64, eps).transpose(1, 2)
    dqkv, dp = torch.autograd.grad(out, (qkv64, p64), dout.double())
    return out.detach(), dqkv, dp


def _run(backend, qkv, policy, dout, eps):
    qkv = qkv.detach().requires_grad_()
    policy = policy.detach().requires_grad_()
    out = ops.policy_attention(*qkv.unbind(2), policy, eps, backend=backend)
    dqkv, dp = torch.autograd.grad(out, (qkv, policy), dout)
    return out, dqkv, dp


def _assert_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    scale = want.abs().max().clamp(min=1.0)
    err = ((got.double() - want).abs() - rtol * want.abs()).max() / scale
    assert err <= atol, f"{what}: error {err:.3g} > {atol:g}"


def _check_backend(backend, shape, dtype, kind, eps):
    qkv, policy, dout = _inputs(*shape, dtype, kind)
    out, dqkv, dp = _run(backend, qkv, policy, dout, eps)
    want_out, want_dqkv, want_dp = _oracle(qkv, policy, dout, eps)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all() and torch.isfinite(dp).all()
    _assert_close(out, want_out, dtype, "out")
    for i, name in enumerate("qkv"):
        _assert_close(dqkv[:, :, i], want_dqkv[:, :, i], dtype, f"d{name}")
    _assert_close(dp, want_dp, dtype, "dpolicy")


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("kind", POLICIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_backend(shape, kind, eps):
    _check_backend("reference", shape, torch.float32, kind, eps)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("kind", ["binary", "soft"])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_float32(shape, kind, eps):
    _check_backend("triton", shape, torch.float32, kind, eps)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("kind", ["ones", "zeros"])
def test_triton_policy_extremes(kind):
    _check_backend("triton", (2, 31, 2, 32), torch.float32, kind, 1e-6)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_16bit(dtype):
    _check_backend("triton", (2, 37, 2, 64), dtype, "binary", 1e-6)


def test_matches_the_training_autograd_form():
    """The op and the CPU autograd form of the training forward (B, H, N, d) are one computation."""
    from spvit_kernels.training.policy_attention import policy_attention as training_form

    qkv, policy, dout = _inputs(2, 45, 3, 32, torch.float32, "soft")
    got = _run("reference", qkv, policy, dout, 1e-6)
    qkv2, pol2 = qkv.detach().requires_grad_(), policy.detach().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv2.unbind(2))
    out = training_form(q, k, v, pol2, 1e-6).transpose(1, 2)
    want = (out, *torch.autograd.grad(out, (qkv2, pol2), dout))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


def test_one_key_and_dropped_rows_read_themselves():
    """N = 1: the row reads itself whatever its policy; a dropped row (policy 0) reads itself only (eps 0)."""
    qkv, _, _ = _inputs(2, 1, 2, 32, torch.float32, "ones")
    out = ops.policy_attention(*qkv.unbind(2), torch.zeros(2, 1), 0.0)
    torch.testing.assert_close(out, qkv[:, :, 2], atol=0, rtol=0)
    qkv, _, _ = _inputs(1, 9, 1, 32, torch.float32, "ones")
    policy = torch.ones(1, 9)
    policy[0, 4] = 0.0
    out = ops.policy_attention(*qkv.unbind(2), policy, 0.0)
    # Row 4 sees keys {0..8} (all alive but itself, which it also sees): the plain softmax; row 0 misses key 4.
    q, k, v = (t[0, :, 0].double() for t in qkv.unbind(2))
    s = (q @ k.T) / 32 ** 0.5
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[:, 4] = False
    mask[4, 4] = True
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(out[0, :, 0].double(), want, atol=1e-6, rtol=1e-6)


def test_gradcheck_float64():
    qkv, policy, _ = _inputs(1, 7, 2, 16, torch.float64, "soft")
    qkv.requires_grad_()
    policy = policy.double().requires_grad_()
    # eps = 0: the row max cancels, so the op's gradient is the exact derivative.
    torch.autograd.gradcheck(lambda a, p: ops.policy_attention(*a.unbind(2), p, 0.0, backend="reference"),
                             (qkv, policy))


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 5, 2)), "q must have 4 dimensions"),
    (dict(k=torch.zeros(2, 6, 2, 32)), "k must have the shape of q"),
    (dict(v=torch.zeros(2, 5, 2, 32, dtype=torch.float16)), "v must have dtype"),
    (dict(policy=torch.zeros(2, 4)), r"policy must have shape \(B, N\)"),
    (dict(policy=torch.zeros(2, 5, dtype=torch.float16)), "policy must have dtype"),
    (dict(eps=-1.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(softmax_scale=float("inf")), "softmax_scale must be"),
    (dict(q=torch.zeros(2, 5, 2, 8), k=torch.zeros(2, 5, 2, 8), v=torch.zeros(2, 5, 2, 8)), "head dim 8"),
    (dict(q=torch.zeros(2, 5, 2, 64)[..., ::2]), "must have a contiguous last dimension"),
])
def test_bad_input(bad, match):
    args = dict(q=torch.zeros(2, 5, 2, 32), k=torch.zeros(2, 5, 2, 32), v=torch.zeros(2, 5, 2, 32),
                policy=torch.ones(2, 5), eps=1e-6, softmax_scale=None)
    args.update(bad)
    if "q" in bad and "k" not in bad and bad["q"].dim() == 4:
        args["k"] = args["v"] = torch.zeros_like(bad["q"])
    with pytest.raises((ValueError, TypeError), match=match):
        ops.policy_attention(**args)
    with pytest.raises((ValueError, TypeError), match=match):  # the raw op checks the same
        torch.ops.spvit.policy_attention(*args.values())


def test_opcheck():
    qkv, policy, _ = _inputs(2, 13, 2, 32, torch.float32, "soft")
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    torch.library.opcheck(torch.ops.spvit.policy_attention_fwd.default,
                          (q, k, v, policy.requires_grad_(), 1e-6, 0.125))


def test_compile_fullgraph_forward_backward():
    qkv, policy, dout = _inputs(2, 21, 2, 32, torch.float32, "soft")

    def step(qkv, policy):
        out = ops.policy_attention(*qkv.unbind(2), policy, 1e-6)
        return torch.autograd.grad((out * dout).sum(), (qkv, policy))

    eager = step(qkv.requires_grad_(), policy.requires_grad_())
    compiled = torch.compile(lambda a, p: ops.policy_attention(*a.unbind(2), p, 1e-6), fullgraph=True)
    out = compiled(qkv, policy)
    got = torch.autograd.grad((out * dout).sum(), (qkv, policy))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 197, 6, 64), (4, 75, 6, 64), (2, 123, 3, 48)])
def test_gpu_triton(shape, dtype):
    qkv, policy, dout = (t.cuda() for t in _inputs(*shape, dtype, "binary"))
    out, dqkv, dp = _run("triton", qkv, policy, dout, 1e-6)
    want_out, want_dqkv, want_dp = _oracle(qkv.cpu(), policy.cpu(), dout.cpu(), 1e-6)
    _assert_close(out.cpu(), want_out, dtype, "out")
    _assert_close(dqkv.cpu(), want_dqkv, dtype, "dqkv")
    _assert_close(dp.cpu(), want_dp, dtype, "dpolicy")


@requires_gpu
def test_gpu_training_forward_uses_the_op():
    """On a GPU the training forward's attention goes through the fused op and agrees with the CPU form."""
    from spvit_kernels.models import create_model

    model = create_model("spvit_deit_tiny", num_classes=5)
    model.train()
    images = torch.randn(2, 3, 224, 224)
    noise = [torch.zeros(1, 1, 2)] * 3
    cpu = model(images, gumbel_noise=noise)
    gpu = model.cuda()(images.cuda(), gumbel_noise=[n.cuda() for n in noise])
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=2e-3, rtol=2e-3)
