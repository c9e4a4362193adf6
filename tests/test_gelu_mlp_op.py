"""torch.ops.spvit.gelu_mlp (a transformer MLP with GELU in the GEMM epilogues): every backend, forward and the
gradients of h and the four weights, against float64 PyTorch (`fc2(gelu(fc1(h)))` with the weights rounded to h's
dtype, as autocast rounds them); poisoned buffers; bad input; opcheck; torch.compile.

Triton runs under TRITON_INTERPRET=1 without a GPU (small shapes). The interpreter truncates float32 to 16-bit
where the GPU rounds to nearest even, so 16-bit u and g are biased toward 0 by up to one unit in the last place,
which the weight gradients (sums over every row) accumulate; the 16-bit tolerances allow that."""

import math

import pytest
import torch
import torch.nn.functional as F

from spvit_kernels import ops

from .utils import requires_gpu, requires_triton_interpret

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (h's leading shape, C, F hidden, C_out): ViT-like token counts (197, 123, 31, 1 tokens; 1 and 257 images), sizes
# that are not multiples of the tiles, one below BLOCK_K, one channel.
SHAPES = [((2, 31), 40, 72, 40), ((257, 1), 16, 64, 8), ((1, 197), 24, 96, 24), ((123,), 7, 5, 3), ((1,), 1, 1, 1)]
DTYPES = [F32, BF16, F16]
# dtype -> (atol, rtol), the error measured against the largest value (at least 1).
TOL = {F32: (2e-5, 2e-5), F16: (4e-3, 4e-3), BF16: (3e-2, 3e-2)}
NAMES = ["dh", "dw1", "db1", "dw2", "db2"]


def _inputs(lead, C, Fh, Co, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, C, generator=g).to(dtype)
    w1 = torch.randn(Fh, C, generator=g) * (2 / math.sqrt(C))
    b1 = torch.randn(Fh, generator=g)
    w2 = torch.randn(Co, Fh, generator=g) / math.sqrt(Fh)
    b2 = torch.randn(Co, generator=g)
    dout = torch.randn(*lead, Co, generator=g).to(dtype)
    return h, [w1, b1, w2, b2], dout


def _oracle(h, weights, dout):
    h64 = h.detach().double().requires_grad_()
    ws = [w.detach().to(h.dtype).double().requires_grad_() if w is not None else None for w in weights]
    w1, b1, w2, b2 = ws
    out = F.linear(F.gelu(F.linear(h64, w1, b1)), w2, b2)
    leaves = [h64] + [w for w in ws if w is not None]
    return out.detach(), torch.autograd.grad(out, leaves, dout.double())


def _run(backend, h, weights, dout):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in [h] + weights]
    out = ops.gelu_mlp(*leaves, backend=backend)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], dout)


def _assert_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    scale = want.abs().max().clamp(min=1.0)
    err = ((got.double() - want).abs() - rtol * want.abs()).max() / scale
    assert err <= atol, f"{what}: error {err:.3g} > {atol:g}"


def _check(backend, shape, dtype, with_bias=True):
    lead, C, Fh, Co = shape
    h, weights, dout = _inputs(lead, C, Fh, Co, dtype)
    if not with_bias:
        weights[1] = weights[3] = None
    out, grads = _run(backend, h, weights, dout)
    want, want_grads = _oracle(h, weights, dout)
    assert out.dtype == dtype and out.shape == (*lead, Co)
    assert [g.dtype for g in grads] == [dtype] + [F32] * (len(grads) - 1)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    _assert_close(out, want, dtype, "out")
    names = [n for n, w in zip(NAMES, [h] + weights) if w is not None]
    for name, g, w in zip(names, grads, want_grads):
        _assert_close(g, w, dtype, name)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_backend(shape, dtype, with_bias):
    _check("reference", shape, dtype, with_bias)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton(shape, dtype):
    _check("triton", shape, dtype)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_triton_without_biases_and_several_tiles():
    """More than one tile along every GEMM dimension (float32 tiles: 64 x 64 x 32), no biases."""
    _check("triton", ((2, 75), 70, 130, 66), F32, with_bias=False)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_poisoned_buffers_and_determinism(backend, monkeypatch):
    """Every buffer the launchers allocate starts as NaN: no unwritten element may leak into a result; two runs
    give bitwise the same outputs and gradients (no atomics, no split-K)."""
    h, weights, dout = _inputs((3, 33), 40, 72, 24, F32, seed=2)
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    runs = [_run(backend, h, weights, dout) for _ in range(2)]
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    a, b = ((r[0], *r[1]) for r in runs)
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)


def test_matches_timm_mlp():
    """The float32 reference backend is timm's Mlp (fc1, nn.GELU, fc2), gradients included."""
    from timm.layers import Mlp

    mlp = Mlp(64, 160)
    h = torch.randn(2, 45, 64, requires_grad=True)
    dout = torch.randn(2, 45, 64)
    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    out = ops.gelu_mlp(h, *params, backend="reference")
    want = mlp(h)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for g, w in zip(torch.autograd.grad(out, [h] + params, dout), torch.autograd.grad(want, [h] + params, dout)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in ((3, 5, 6), (8, 6), (8,), (4, 8), (4,))]
    torch.autograd.gradcheck(lambda *a: ops.gelu_mlp(*a, backend="reference"), args)


_GOOD = dict(h=torch.zeros(5, 8), w1=torch.zeros(16, 8), b1=torch.zeros(16), w2=torch.zeros(8, 16),
             b2=torch.zeros(8))


@pytest.mark.parametrize("bad, match", [
    (dict(h=torch.zeros(5, 8, dtype=torch.int64)), "h must have dtype"),
    (dict(h=torch.zeros(5, 0), w1=torch.zeros(16, 0)), "h must have at least one channel"),
    (dict(w1=torch.zeros(16, 7)), r"w1 must have shape \(F, 8\)"),
    (dict(w1=torch.zeros(16)), "w1 must have 2 dimensions"),
    (dict(b1=torch.zeros(15)), r"b1 must have shape \(16,\)"),
    (dict(w2=torch.zeros(8, 15)), r"w2 must have shape \(C_out, 16\)"),
    (dict(b2=torch.zeros(8, dtype=torch.float64)), "b2 must have dtype"),
])
def test_bad_input(bad, match):
    args = dict(_GOOD, **bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.gelu_mlp(**args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):  # the raw op checks the same
        torch.ops.spvit.gelu_mlp(*args.values())


def test_bad_backward_input():
    h, w1, w2 = torch.zeros(5, 8), torch.zeros(16, 8), torch.zeros(8, 16)
    u = torch.zeros(5, 16)
    with pytest.raises(ValueError, match=r"dout must have shape \(5, 8\)"):
        torch.ops.spvit.gelu_mlp_bwd(torch.zeros(5, 4), h, u, u, w1, None, w2, None)
    with pytest.raises(ValueError, match=r"g must have shape \(5, 16\)"):
        torch.ops.spvit.gelu_mlp_bwd(torch.zeros(5, 8), h, u, u[:4], w1, None, w2, None)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    h, weights, _ = _inputs((13,), 24, 40, 16, F32)
    if not with_bias:
        weights[1] = weights[3] = None
    args = [t.requires_grad_() if t is not None else None for t in [h] + weights]
    torch.library.opcheck(torch.ops.spvit.gelu_mlp_fwd.default, tuple(args))


def test_compile_fullgraph_forward_backward():
    h, weights, dout = _inputs((2, 21), 32, 64, 32, F32)
    eager = _run(None, h, weights, dout)
    leaves = [t.detach().requires_grad_() for t in [h] + weights]
    out = torch.compile(lambda *a: ops.gelu_mlp(*a), fullgraph=True)(*leaves)
    torch.testing.assert_close(out, eager[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(out, leaves, dout), eager[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((64, 197), 384, 1536, 384), ((4, 197), 768, 3072, 768), ((257, 1), 16, 64, 8)])
def test_gpu_triton(shape, dtype):
    lead, C, Fh, Co = shape
    h, weights, dout = _inputs(lead, C, Fh, Co, dtype)
    out, grads = _run("triton", h.cuda(), [w.cuda() for w in weights], dout.cuda())
    want, want_grads = _oracle(h, weights, dout)
    _assert_close(out.cpu(), want, dtype, "out")
    for name, g, w in zip(NAMES, grads, want_grads):
        _assert_close(g.cpu(), w, dtype, name)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_no_grad_forward_keeps_nothing(backend, monkeypatch):
    """Without a gradient to compute (torch.no_grad, as the teacher runs) fc1 writes gelu(u) only: the same output,
    and the raw forward returns u and g empty; asking such a forward for a gradient is an error, not zeros."""
    h, weights, dout = _inputs((2, 31), 40, 72, 40, BF16)
    with_grad, _ = _run(backend, h, weights, dout)
    with torch.no_grad():
        without = ops.gelu_mlp(h, *weights, backend=backend)
    torch.testing.assert_close(without, with_grad, atol=0, rtol=0)
    out, u, g = torch.ops.spvit.gelu_mlp_fwd(h.reshape(-1, 40), *weights, False)
    assert u.shape == g.shape == (0,)
    hr = h.reshape(-1, 40).detach().requires_grad_()
    out = torch.ops.spvit.gelu_mlp_fwd(hr, *weights, False)[0]
    with pytest.raises(RuntimeError, match=r"for_backward=False\) keeps nothing for backward"):
        out.sum().backward()


def test_opcheck_without_backward():
    h, weights, _ = _inputs((13,), 24, 40, 16, F32)
    torch.library.opcheck(torch.ops.spvit.gelu_mlp_fwd.default, (h, *weights, False),
                          test_utils=("test_schema", "test_faketensor"))
