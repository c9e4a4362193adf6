"""torch.ops.spvit.add_layer_norm (residual add + LayerNorm in one pass): every backend, forward and every gradient
(x, branch, weight, bias, with and without a gradient reaching the sum from the residual path) against float64
PyTorch (`x + branch` then `F.layer_norm`); poisoned buffers; bad input; opcheck; torch.compile.

Triton runs under TRITON_INTERPRET=1 without a GPU (small shapes). The interpreter casts float32 to 16-bit by
truncation where the GPU rounds to nearest even, so a 16-bit output may sit one unit in the last place further
from the oracle than on a GPU: the 16-bit tolerances below allow that."""

import math

import pytest
import torch
import torch.nn.functional as F

from spvit_kernels import ops

from .utils import requires_gpu, requires_triton_interpret

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (x's shape): ViT-like odd row counts (197, 123, 31, 1 tokens; 1 and 257 images) and channel counts (odd, not a
# power of two, DeiT-S's 384, one channel).
SHAPES = [(2, 197, 48), (257, 1, 40), (1, 31, 384), (123, 7), (1, 1, 1)]
# (x dtype, branch dtype or None, out_dtype or None): the autocast training block (float32 stream, bf16 branch and
# output), its first norm (no branch), plain 16-bit and float32 streams.
CONFIGS = [(F32, BF16, BF16), (F32, None, BF16), (BF16, BF16, None), (F16, F16, None), (F32, F32, None),
           (F32, F16, F16)]
AFFINE = ["weight_bias", "none", "weight"]
# dtype of the compared tensor -> (atol, rtol) on values scaled to order 1.
TOL = {F32: (2e-5, 2e-5), F16: (4e-3, 4e-3), BF16: (3e-2, 3e-2)}


def _inputs(shape, config, affine, seed=0):
    xd, bd, od = config
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(xd)
    branch = torch.randn(shape, generator=g).to(bd) if bd is not None else None
    weight = torch.randn(C, generator=g) if affine != "none" else None
    bias = torch.randn(C, generator=g) if affine == "weight_bias" else None
    s_dtype = torch.promote_types(xd, bd) if bd is not None else xd
    dy = torch.randn(shape, generator=g).to(od or s_dtype)
    dsum = torch.randn(shape, generator=g).to(s_dtype) if bd is not None else None
    return x, branch, weight, bias, dy, dsum


def _leaves(tensors, double=False):
    return [None if t is None else (t.detach().double() if double else t.detach()).requires_grad_()
            for t in tensors]


def _oracle(x, branch, weight, bias, dy, dsum, eps):
    x64, b64, w64, bi64 = _leaves((x, branch, weight, bias), double=True)
    s = x64 + b64 if b64 is not None else x64
    y = F.layer_norm(s, s.shape[-1:], w64, bi64, eps)
    loss = (y * dy.double()).sum() + ((s * dsum.double()).sum() if dsum is not None else 0)
    leaves = [t for t in (x64, b64, w64, bi64) if t is not None]
    return s.detach(), y.detach(), torch.autograd.grad(loss, leaves)


def _run(backend, x, branch, weight, bias, dy, dsum, eps, out_dtype):
    x, branch, weight, bias = _leaves((x, branch, weight, bias))
    s, y = ops.add_layer_norm(x, branch, weight, bias, eps, out_dtype, backend=backend)
    outs = [y] + ([s] if dsum is not None else [])
    grads = [dy] + ([dsum] if dsum is not None else [])
    leaves = [t for t in (x, branch, weight, bias) if t is not None]
    return s, y, torch.autograd.grad(outs, leaves, grads)


def _assert_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    scale = want.abs().max().clamp(min=1.0)
    err = ((got.double() - want).abs() - rtol * want.abs()).max() / scale
    assert err <= atol, f"{what}: error {err:.3g} > {atol:g}"


def _lowest(*dtypes):
    """The least precise of the dtypes (None ignored): whose tolerance a result computed from them gets."""
    return BF16 if BF16 in dtypes else F16 if F16 in dtypes else F32


def _check(backend, shape, config, affine, eps=1e-5, with_dsum=True):
    x, branch, weight, bias, dy, dsum = _inputs(shape, config, affine)
    dsum = dsum if with_dsum else None
    s, y, grads = _run(backend, x, branch, weight, bias, dy, dsum, eps, config[2])
    want_s, want_y, want_grads = _oracle(x, branch, weight, bias, dy, dsum, eps)
    s_dtype = want_s.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    assert y.dtype == (config[2] or (x.dtype if branch is None else s_dtype)) and y.shape == x.shape
    if branch is None:
        assert s.shape == (0,)
    else:
        assert s.dtype == s_dtype and s.shape == x.shape
        _assert_close(s, want_s, s_dtype, "s")
    assert all(torch.isfinite(t).all() for t in (y, *grads))
    # y's error: its own rounding plus that of the sum it normalises
    _assert_close(y, want_y, _lowest(y.dtype, s_dtype), "y")
    names = ["dx"] + (["dbranch"] if branch is not None else []) + (["dweight"] if weight is not None else []) \
        + (["dbias"] if bias is not None else [])
    for name, g, w in zip(names, grads, want_grads):
        _assert_close(g, w, _lowest(*config), name)
    affine_grads = len(names) - 1 - (branch is not None)
    assert [g.dtype for g in grads] == [x.dtype] + ([branch.dtype] if branch is not None else []) + [F32] * affine_grads


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_backend(shape, config, affine):
    _check("reference", shape, config, affine)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("shape", SHAPES)
def test_triton(shape, config):
    _check("triton", shape, config, "weight_bias")


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("affine", ["none", "weight"])
@pytest.mark.parametrize("with_dsum", [True, False])
def test_triton_affine_and_residual_gradient(affine, with_dsum):
    _check("triton", (3, 31, 48), (F32, BF16, BF16), affine, eps=1e-6, with_dsum=with_dsum)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_triton_many_rows_per_backward_program():
    """More row tiles than backward programs: each program loops over a span of rows (and the last is short)."""
    from spvit_kernels.triton import add_layer_norm as mod

    old = mod.BWD_PROGRAMS
    mod.BWD_PROGRAMS = 3
    try:
        _check("triton", (5, 197, 24), (F32, BF16, BF16), "weight_bias")
    finally:
        mod.BWD_PROGRAMS = old


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_poisoned_buffers_and_determinism(backend, monkeypatch):
    """Every buffer the launchers allocate starts as NaN: no unwritten element may leak into a result; two runs
    give bitwise the same outputs and gradients (no atomics)."""
    x, branch, weight, bias, dy, dsum = _inputs((4, 33, 40), (F32, BF16, BF16), "weight_bias", seed=3)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", poisoned)
    runs = [_run(backend, x, branch, weight, bias, dy, dsum, 1e-5, BF16) for _ in range(2)]
    monkeypatch.setattr(torch, "empty", empty)
    a, b = ((r[0], r[1], *r[2]) for r in runs)
    for u, v in zip(a, b):
        assert torch.isfinite(u).all()
        assert torch.equal(u, v)


def test_empty_rows():
    x = torch.randn(0, 5, 48)
    for backend in ["reference"] + (["triton"] if "triton" in ops.available_backends("add_layer_norm")
                                    and torch.device("cpu").type in _triton_types() else []):
        xr = x.clone().requires_grad_()
        s, y = ops.add_layer_norm(xr, torch.randn(0, 5, 48), torch.ones(48), torch.zeros(48), backend=backend)
        assert s.shape == y.shape == (0, 5, 48)
        (g,) = torch.autograd.grad(y.sum(), xr)
        assert g.shape == x.shape


def _triton_types():
    from spvit_kernels._triton_support import triton_device_types

    return triton_device_types()


def test_matches_pytorch_add_then_layer_norm():
    """The reference backend is PyTorch's own `x + branch; F.layer_norm` (float32), gradients included."""
    x, branch, weight, bias, dy, dsum = _inputs((2, 45, 64), (F32, F32, None), "weight_bias", seed=5)
    s, y, grads = _run("reference", x, branch, weight, bias, dy, dsum, 1e-6, None)
    xs, bs, ws, bis = _leaves((x, branch, weight, bias))
    s2 = xs + bs
    y2 = F.layer_norm(s2, (64,), ws, bis, 1e-6)
    want = torch.autograd.grad([y2, s2], [xs, bs, ws, bis], [dy, dsum])
    torch.testing.assert_close(s, s2, atol=0, rtol=0)
    torch.testing.assert_close(y, y2, atol=2e-6, rtol=2e-6)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x, branch = (torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(x, branch, weight, bias):
        s, y = ops.add_layer_norm(x, branch, weight, bias, 1e-5, backend="reference")
        return s * 0.5, y

    torch.autograd.gradcheck(f, (x, branch, weight, bias))
    torch.autograd.gradcheck(lambda x, w: ops.add_layer_norm(x, None, w, None, 1e-5, backend="reference")[1],
                             (x, weight))


_GOOD = dict(x=torch.zeros(2, 5, 8), branch=torch.zeros(2, 5, 8), weight=torch.ones(8), bias=torch.zeros(8),
             eps=1e-5, out_dtype=None)


@pytest.mark.parametrize("bad, match", [
    (dict(x=[1.0]), "x must be a torch.Tensor"),
    (dict(x=torch.zeros(2, 5, 8, dtype=torch.int32)), "x must have dtype"),
    (dict(x=torch.zeros(2, 5, 0), branch=torch.zeros(2, 5, 0)), "x must have a non-empty last dimension"),
    (dict(x=torch.zeros(1, 8193), branch=None, weight=None, bias=None), "at most 8192"),
    (dict(branch=torch.zeros(2, 5, 7)), "branch must have the shape of x"),
    (dict(branch=torch.zeros(2, 5, 8, dtype=torch.float64)), "branch must have dtype"),
    (dict(weight=torch.ones(7)), r"weight must have shape \(8,\)"),
    (dict(bias=torch.zeros(8, 1)), "bias must have 1 dimensions"),
    (dict(eps=-1.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(out_dtype=torch.int8), "out_dtype must be"),
])
def test_bad_input(bad, match):
    args = dict(_GOOD, **bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.add_layer_norm(**args)
    if not isinstance(args["x"], list):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):  # the raw op checks the same
            torch.ops.spvit.add_layer_norm(*args.values())


def test_bad_backward_input():
    s = torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match=r"mean must have shape \(10,\)"):
        torch.ops.spvit.add_layer_norm_bwd(s, None, s, None, None, torch.zeros(9), torch.zeros(10), F32, None)
    with pytest.raises(ValueError, match="dsum must have the shape of s"):
        torch.ops.spvit.add_layer_norm_bwd(s, s[:1], s, None, None, torch.zeros(10), torch.zeros(10), F32, None)


@pytest.mark.parametrize("config", [(F32, BF16, BF16), (F32, None, None)])
def test_opcheck(config):
    x, branch, weight, bias, _, _ = _inputs((2, 13, 24), config, "weight_bias")
    x, branch, weight, bias = _leaves((x, branch, weight, bias))
    torch.library.opcheck(torch.ops.spvit.add_layer_norm_fwd.default, (x, branch, weight, bias, 1e-5, config[2]))


def test_compile_fullgraph_forward_backward():
    x, branch, weight, bias, dy, dsum = _inputs((2, 21, 32), (F32, F32, None), "weight_bias")

    def block(x, branch, weight, bias):
        s, y = ops.add_layer_norm(x, branch, weight, bias, 1e-6)
        return s, y

    eager = _run(None, x, branch, weight, bias, dy, dsum, 1e-6, None)
    leaves = _leaves((x, branch, weight, bias))
    s, y = torch.compile(block, fullgraph=True)(*leaves)
    got = torch.autograd.grad([y, s], leaves, [dy, dsum])
    torch.testing.assert_close(y, eager[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(got, eager[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@requires_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("shape", [(256, 197, 384), (4, 197, 768), (257, 1, 40)])
def test_gpu_triton(shape, config):
    x, branch, weight, bias, dy, dsum = (t.cuda() if t is not None else None
                                         for t in _inputs(shape, config, "weight_bias"))
    s, y, grads = _run("triton", x, branch, weight, bias, dy, dsum, 1e-5, config[2])
    want_s, want_y, want_grads = _oracle(*(t.cpu() if t is not None else None
                                           for t in (x, branch, weight, bias, dy, dsum)), 1e-5)
    _assert_close(y.cpu(), want_y, _lowest(*config), "y")
    for g, w in zip(grads, want_grads):
        _assert_close(g.cpu(), w, _lowest(*config), "grad")


# --- branch_scale (stochastic depth folded into the pass) ------------------------------------------------------


def _drop_scale(shape, dtype, seed=0, keep=0.8):
    """Per-row factors as DropPath forms them: per image (dim 0) 0 or 1 / keep in the branch's dtype, at least one
    of each when there are two or more images; a 2-D x gets arbitrary positive factors per row instead."""
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 2:
        return torch.rand(shape[0], generator=g) * 2 + 0.1
    mask = (torch.rand(shape[0], generator=g) < keep).to(dtype)
    if shape[0] > 1:
        mask[0], mask[1] = 0, 1
    return (mask / keep).to(dtype).float().reshape((shape[0],) + (1,) * (len(shape) - 2)).expand(shape[:-1])


def _run_scaled(backend, x, branch, weight, bias, dy, dsum, eps, out_dtype, scale):
    x, branch, weight, bias = _leaves((x, branch, weight, bias))
    s, y = ops.add_layer_norm(x, branch, weight, bias, eps, out_dtype, scale, backend=backend)
    leaves = [t for t in (x, branch, weight, bias) if t is not None]
    return s, y, torch.autograd.grad([y, s], leaves, [dy, dsum])


SCALE_CONFIGS = [(F32, BF16, BF16), (BF16, BF16, None), (F32, F32, None), (F32, F16, F16)]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
@pytest.mark.parametrize("config", SCALE_CONFIGS, ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("shape", [(3, 197, 48), (257, 1, 40), (123, 7)])
def test_branch_scale(backend, shape, config):
    """s = x + round(branch * scale): the same outputs and x / weight / bias gradients as the op on the pre-scaled
    branch, and dbranch = round(round(ds) * scale), the gradient `branch * mask` gets in PyTorch. Exact for float32
    branches and the reference backend; the interpreter truncates float32 to 16 bits where PyTorch (and a GPU)
    rounds, so 16-bit branches under it agree to their tolerance."""
    x, branch, weight, bias, dy, dsum = _inputs(shape, config, "weight_bias", seed=2)
    scale = _drop_scale(shape, branch.dtype)
    scaled = (branch.float() * scale[..., None]).to(branch.dtype)
    s1, y1, (dx1, dbr1, dw1, db1) = _run_scaled(backend, x, branch, weight, bias, dy, dsum, 1e-5, config[2], scale)
    s2, y2, (dx2, dbr2, dw2, db2) = _run_scaled(backend, x, scaled, weight, bias, dy, dsum, 1e-5, config[2], None)
    want_dbr = (dbr2.float() * scale[..., None]).to(branch.dtype)
    if scale.dim() > 1 and shape[0] > 1:
        assert (dbr1[0] == 0).all() and (dbr1[1] != 0).any()  # a dropped image's branch gets no gradient
    exact = backend == "reference" or branch.dtype == F32
    for got, want, what in ((s1, s2, "s"), (y1, y2, "y"), (dx1, dx2, "dx"), (dw1, dw2, "dweight"),
                            (db1, db2, "dbias"), (dbr1, want_dbr, "dbranch")):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        if exact:
            assert torch.equal(got, want), what
        else:
            _assert_close(got, want.double(), _lowest(*config), what)


def test_branch_scale_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x, branch = (torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = torch.rand(3, 5, generator=g, dtype=torch.float64) * 2

    def f(x, branch, weight, bias):
        s, y = ops.add_layer_norm(x, branch, weight, bias, 1e-5, None, scale, backend="reference")
        return s * 0.5, y

    torch.autograd.gradcheck(f, (x, branch, weight, bias))
    s, _ = ops.add_layer_norm(x, branch, weight, bias, 1e-5, None, scale, backend="reference")
    torch.testing.assert_close(s, x + branch * scale[..., None], atol=0, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(branch_scale=torch.ones(2, 4)), r"branch_scale must have shape \(2, 5\)"),
    (dict(branch_scale=torch.ones(2, 5, 8)), r"branch_scale must have shape \(2, 5\)"),
    (dict(branch_scale=torch.ones(2, 5, dtype=torch.int32)), "branch_scale must have dtype"),
    (dict(branch=None, branch_scale=torch.ones(2, 5)), "branch_scale needs a branch"),
])
def test_bad_branch_scale(bad, match):
    args = dict(_GOOD, branch_scale=None, **{k: v for k, v in bad.items() if k != "branch_scale"})
    args["branch_scale"] = bad["branch_scale"]
    with pytest.raises((ValueError, TypeError), match=match):
        ops.add_layer_norm(**args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        torch.ops.spvit.add_layer_norm(*args.values())


def test_opcheck_branch_scale():
    x, branch, weight, bias, _, _ = _inputs((2, 13, 24), (F32, BF16, BF16), "weight_bias")
    x, branch, weight, bias = _leaves((x, branch, weight, bias))
    scale = _drop_scale((2, 13, 24), BF16).contiguous()
    torch.library.opcheck(torch.ops.spvit.add_layer_norm_fwd.default, (x, branch, weight, bias, 1e-5, BF16, scale))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[requires_triton_interpret,
                                                                                pytest.mark.triton_interpret])])
def test_backward_without_dy(backend):
    """Only the residual path's gradient (dy None): dx = dsum, dbranch = dsum (scaled per row with branch_scale),
    no weight or bias gradient."""
    from spvit_kernels.ops import _registry

    bwd = _registry.resolve("add_layer_norm_backward", backend, torch.device("cpu")).fn
    x, branch, weight, bias, _, dsum = _inputs((3, 9, 16), (F32, BF16, BF16), "weight_bias", seed=6)
    s, _, mean, rstd = torch.ops.spvit.add_layer_norm_fwd(x, branch, weight, bias, 1e-5, BF16)
    scale = _drop_scale((3, 9, 16), BF16).contiguous()
    for sc in (None, scale):
        dx, dbr, dw, db = bwd(None, dsum, s, weight, bias, mean, rstd, F32, BF16, sc)
        assert torch.equal(dx, dsum)
        want = dsum.to(BF16) if sc is None else (dsum.to(BF16).float() * sc[..., None]).to(BF16)
        assert dbr.dtype == BF16 and torch.equal(dbr, want)
        assert not dw.any() and not db.any() and dw.shape == db.shape == (16,)
