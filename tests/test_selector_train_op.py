"""torch.ops.spvit.selector_train (the selector's training form, `TokenSelector.train_scores`): both backends, the
outputs and every gradient (dS, dweights and the 14 selector weights) against train_scores in float64; gradcheck
of the reference; opcheck; bad inputs; train_scores' dispatch.

The float64 oracle is `TokenSelector.train_scores` on a float64 copy of the selector and of the (dtype-rounded)
inputs. One exception: the weights' gradient in an image whose weights are all zero. There the global mean's
denominator is clamped to `tiny` and d glob / d m_i = u_i / tiny, which depends on the compute dtype's tiny
(float32's for the op, float64's in a float64 train_scores): that gradient is compared against the float64
reference math with float32's tiny. Triton runs under TRITON_INTERPRET=1 without a GPU (tests/conftest.py sets
it), on tiny shapes.
"""

import math

import pytest
import torch

from spvit_kernels import ops
from spvit_kernels.models.selector import TokenSelector
from spvit_kernels.reference.selector_train import forward_math

from .utils import requires_gpu, requires_triton_interpret

NAMES = ("dS", "dweights", "ln_weight", "ln_bias", "w_in", "b_in", "w1", "b1", "w2", "b2", "w3", "b3", "se_w1",
         "se_b1", "se_w2", "se_b2")
# (C, H): d = 16 (two heads), d = 16 (four heads: H // 2 = 2 SE units), d = 48 (padded to 64).
WIDTHS = [(32, 2), (64, 4), (96, 2)]
LENGTHS = [31, 1, 13]
# dtype -> (atol, rtol): max(|got - want| - rtol |want|) over a tensor, divided by max(max |want|, 1e-2) (the
# floor: gradients of order 1e-3, the SE branch's, are held to an absolute error), against the float64 oracle.
# float32's atol covers the SE gradients: d w_h = (log_softmax_h - score) . dscore / sum(w) cancels O(1) terms
# to O(1e-2) per row (float32 autograd of train_scores does the same), ~1e-7 absolute error per row. 16-bit S:
# TF32 dot operands (emulated under the interpreter), dS rounded to S's dtype; measured at most 2.3e-3 (5.3e-3
# for bfloat16 dS), float16 1.8e-3.
TOL = {torch.float32: (1e-4, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (8e-3, 8e-3)}
F32_TINY = torch.finfo(torch.float32).tiny


def _selector(C, H, seed=0):
    """A float32 selector (nn's default init, see conftest), its LayerNorm affine part moved off (1, 0)."""
    torch.manual_seed(seed)
    sel = TokenSelector(C, H)
    with torch.no_grad():
        sel.norm.weight.add_(0.3 * torch.randn(C // H))
        sel.norm.bias.add_(0.3 * torch.randn(C // H))
    return sel


def _weights(B, M, g, kind="mixed"):
    """(B, M) float32. mixed: image 0 with zeros, ones and soft values (at least one row non-zero), every later
    image all zero; ones / soft: every image."""
    if kind == "ones":
        return torch.ones(B, M)
    if kind == "soft":
        return torch.rand(B, M, generator=g)
    w = torch.zeros(B, M)
    w[0] = torch.rand(M, generator=g)
    w[0, ::3] = 0.0
    w[0, 1::3] = 1.0
    w[0, -1] = 1.0
    return w


def _inputs(B, M, C, H, dtype, kind="mixed", seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, M, C, generator=g).to(dtype)
    return S, _weights(B, M, g, kind), torch.randn(B, M, 2, generator=g), torch.randn(B, M, 2, generator=g)


def _grads(fn, S, weights, params, dscore, dprob):
    S = S.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    score, prob = fn(S, weights, params)
    grads = torch.autograd.grad((score * dscore.to(score.dtype)).sum() + (prob * dprob.to(prob.dtype)).sum(),
                                [S, weights] + params)
    return score.detach(), prob.detach(), list(grads)


def _train_scores_grads(sel, S, weights, dscore, dprob):
    """train_scores and its gradients in S, weights and the selector's own parameters."""
    S = S.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    score, prob = sel.train_scores(S, weights)
    grads = torch.autograd.grad((score * dscore.to(score.dtype)).sum() + (prob * dprob.to(prob.dtype)).sum(),
                                [S, weights] + list(sel.op_weights()))
    return score.detach(), prob.detach(), list(grads)


def _oracle(sel, S, weights, dscore, dprob):
    """train_scores in float64 -> (score, prob, grads); the zero images' dweights with float32's tiny."""
    sel64 = TokenSelector(sel.dim, sel.num_heads, dtype=torch.float64)
    sel64.load_state_dict(sel.state_dict())
    S64, w64 = S.double(), weights.double()
    score, prob, grads = _train_scores_grads(sel64, S64, w64, dscore.double(), dprob.double())
    zero = weights.sum(1) == 0
    if zero.any():
        def f32_tiny(S_, w_, ps):
            f = forward_math(S_, w_, sel.num_heads, ps, tiny=F32_TINY)
            return f["score"], f["prob"]

        params = [p.detach() for p in sel64.op_weights()]
        grads[1][zero] = _grads(f32_tiny, S64, w64, params, dscore.double(), dprob.double())[2][1][zero]
    return score, prob, grads


def _op(backend, H):
    return lambda S, w, params: ops.selector_train(S, w, H, *params, backend=backend)


def _assert_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: not finite"
    scale = max(want.abs().max().item(), 1e-2)
    err = ((got.double() - want).abs() - rtol * want.abs()).max().item() / scale
    assert err <= atol, f"{what}: error {err:.3g} > {atol:g}"


def _check(backend, B, M, C, H, dtype, kind="mixed"):
    sel = _selector(C, H)
    S, weights, dscore, dprob = _inputs(B, M, C, H, dtype, kind)
    params = list(sel.op_weights())
    score, prob, grads = _grads(_op(backend, H), S, weights, params, dscore, dprob)
    want_score, want_prob, want_grads = _oracle(sel, S, weights, dscore, dprob)
    assert score.dtype == prob.dtype == torch.float32 and score.shape == (B, M, 2)
    _assert_close(score, want_score, dtype, "score")
    _assert_close(prob, want_prob, dtype, "prob")
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32
    zero = weights.sum(1) == 0
    for name, g, w in zip(NAMES, grads, want_grads):
        if name == "dweights" and zero.any():
            # float32's 1 / tiny: kept apart so that its scale (~1e36) does not swallow the other images'
            _assert_close(g[zero], w[zero], dtype, "dweights (zero images)")
            g, w = g[~zero], w[~zero]
            if g.numel() == 0:
                continue
        _assert_close(g, w, dtype, name)


# --- reference backend ----------------------------------------------------------------------------------------


def test_gradcheck_reference_float64():
    B, M, C, H = 1, 3, 16, 2
    sel = TokenSelector(C, H, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    S = torch.randn(B, M, C, generator=g, dtype=torch.float64, requires_grad=True)
    weights = (0.2 + torch.rand(B, M, generator=g, dtype=torch.float64)).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in sel.op_weights()]
    with torch.no_grad():
        params[0].add_(0.3 * torch.randn(C // H, generator=g, dtype=torch.float64))
        params[1].add_(0.3 * torch.randn(C // H, generator=g, dtype=torch.float64))
    fn = lambda S_, w_, *ps: ops.selector_train(S_, w_, H, *ps, backend="reference")  # noqa: E731
    torch.autograd.gradcheck(fn, (S, weights, *params))


@pytest.mark.parametrize("kind", ["mixed", "soft", "ones"])
@pytest.mark.parametrize("C, H", WIDTHS)
def test_reference_backend(C, H, kind):
    _check("reference", 2, 13, C, H, torch.float32, kind)


def test_reference_matches_train_scores_float32():
    """The op's reference and the CPU train_scores are one computation (float32, both)."""
    sel = _selector(64, 4)
    S, weights, dscore, dprob = _inputs(2, 13, 64, 4, torch.float32, "soft")
    params = list(sel.op_weights())
    got = _grads(_op("reference", 4), S, weights, params, dscore, dprob)
    want = _train_scores_grads(sel, S, weights, dscore, dprob)
    for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_only_one_output_used():
    """Autograd passes None for an unused output: its gradient counts as zero."""
    sel = _selector(32, 2)
    S, weights, _, _ = _inputs(1, 5, 32, 2, torch.float32)
    S.requires_grad_()
    score, _ = ops.selector_train(S, weights, 2, *sel.op_weights(), backend="reference")
    (dS,) = torch.autograd.grad(score.sum(), S)
    S2 = S.detach().requires_grad_()
    score2, prob2 = ops.selector_train(S2, weights, 2, *sel.op_weights(), backend="reference")
    (want,) = torch.autograd.grad(score2.sum() + 0 * prob2.sum(), S2)
    torch.testing.assert_close(dS, want)


def _op_args(B=2, M=7, C=32, H=2):
    sel = _selector(C, H)
    S, weights, _, _ = _inputs(B, M, C, H, torch.float32, "mixed")
    return (S.requires_grad_(), weights.requires_grad_(), H,
            *(p.detach().clone().requires_grad_() for p in sel.op_weights()))


def test_opcheck_forward():
    torch.library.opcheck(torch.ops.spvit.selector_train_fwd.default, _op_args())


def test_opcheck_backward():
    args = _op_args()
    saved = torch.ops.spvit.selector_train_fwd(*args)
    g = torch.Generator().manual_seed(1)
    dscore, dprob = torch.randn(2, 7, 2, generator=g), torch.randn(2, 7, 2, generator=g)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.spvit.selector_train_bwd.default,
                          (dscore, dprob, *plain, *(t.detach() for t in saved)))


def test_composite_matches_the_eager_path():
    args = _op_args()
    got = torch.ops.spvit.selector_train(*args)
    want = ops.selector_train(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ga = torch.autograd.grad(got[0].sum() + got[1][..., 0].sum(), args[0])
    gb = torch.autograd.grad(want[0].sum() + want[1][..., 0].sum(), args[0])
    torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-6)


def _bad_args(**bad):
    sel = _selector(32, 2)
    args = dict(S=torch.zeros(2, 5, 32), weights=torch.ones(2, 5), num_heads=2)
    args.update(zip(("ln_weight", "ln_bias", "w_in", "b_in", "w1", "b1", "w2", "b2", "w3", "b3", "se_w1", "se_b1",
                     "se_w2", "se_b2"), (p.detach() for p in sel.op_weights())))
    args.update(bad)
    return args


@pytest.mark.parametrize("bad, match", [
    (dict(S=torch.zeros(2, 5)), "S must have 3 dimensions"),
    (dict(S=torch.zeros(2, 5, 32, dtype=torch.int32)), "S must have dtype"),
    (dict(weights=torch.ones(2, 4)), r"weights must have shape \(B, M\)"),
    (dict(weights=torch.ones(2, 5, dtype=torch.float16)), "weights must have dtype"),
    (dict(num_heads=1), "num_heads must be >= 2"),
    (dict(num_heads=3), "num_heads = 3 must divide"),
    (dict(S=torch.zeros(2, 5, 24), num_heads=4), "head dim C / num_heads = 6 must be a multiple of 4"),
    (dict(w_in=torch.zeros(16, 8)), r"w_in must have shape \(16, 16\)"),
    (dict(se_w2=torch.zeros(2, 2)), r"se_w2 must have shape \(2, 1\)"),
    (dict(b3=torch.zeros(2, dtype=torch.float16)), "b3 must have dtype"),
    (dict(weights=torch.ones(2, 5, device="meta")), "weights must be on cpu"),
])
def test_bad_input(bad, match):
    args = _bad_args(**bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.selector_train(**args)
    with pytest.raises((ValueError, TypeError), match=match):  # the raw op checks the same
        torch.ops.spvit.selector_train(*args.values())


def test_float64_needs_the_reference_backend():
    args = _bad_args(S=torch.zeros(2, 5, 32, dtype=torch.float64), weights=torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="S must have dtype"):
        ops.selector_train(**args)
    score, prob = ops.selector_train(**args, backend="reference")
    assert score.dtype == prob.dtype == torch.float64


def test_train_scores_on_cpu_does_not_use_the_op(monkeypatch):
    """CPU tokens keep the PyTorch form of train_scores."""
    sel = _selector(32, 2)
    S, weights, _, _ = _inputs(2, 5, 32, 2, torch.float32)
    want = sel.train_scores(S, weights)

    def fail(*args, **kwargs):
        raise AssertionError("the op was called on CPU tokens")

    monkeypatch.setattr(ops, "selector_train", fail)
    got = sel.train_scores(S, weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- Triton backend (TRITON_INTERPRET=1) ----------------------------------------------------------------------


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("C, H", WIDTHS, ids=["d16h2", "d16h4", "d48h2"])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("M", LENGTHS)
def test_triton(M, B, C, H, dtype):
    _check("triton", B, M, C, H, dtype)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("kind", ["ones", "soft"])
def test_triton_weight_kinds(kind):
    _check("triton", 2, 13, 64, 4, torch.float32, kind)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_triton_float16_and_many_tiles():
    """float16 operands; M = 40: two row tiles, so two chunks in the per-(image, head) kernels and two combine
    tiles whose partials are summed."""
    _check("triton", 2, 40, 64, 4, torch.float16)
    _check("triton", 1, 40, 32, 2, torch.float32, "soft")


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("C, H", [(48, 3), (256, 16), (64, 16)], ids=["h3", "h16", "h16d4"])
def test_triton_head_counts(C, H):
    """An odd head count (one SE unit), the most heads (BLOCK_H = 16, eight SE units), and d = 4 (d/4 = 1)."""
    _check("triton", 2, 13, C, H, torch.float32)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("C, H, M", [(160, 2, 13), (384, 3, 31)], ids=["d80", "d128"])
def test_triton_wide_heads(C, H, M, dtype):
    """d > 64 (BLOCK_D = 128): the backward writes da and ln and dW_in comes from one GEMM after the kernel."""
    from spvit_kernels.triton import selector_train as triton_selector

    assert triton_selector.launch_meta(C, H, dtype, M)["_bwd_head_kernel"]["constexprs"]["DW_IN_TILE"] is False
    _check("triton", 2, M, C, H, dtype)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_triton_wide_heads_poisoned_buffers(monkeypatch):
    """The wide path's da / ln buffers start as NaN: every element the dW_in GEMM reads must have been written."""
    sel = _selector(160, 2)
    S, weights, dscore, dprob = _inputs(2, 9, 160, 2, torch.float32)
    params = list(sel.op_weights())
    want = _grads(_op("triton", 2), S, weights, params, dscore, dprob)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", poisoned)
    got = _grads(_op("triton", 2), S, weights, params, dscore, dprob)
    monkeypatch.setattr(torch, "empty", empty)
    for x, y in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert torch.equal(x, y)


@requires_triton_interpret
@pytest.mark.triton_interpret
@pytest.mark.parametrize("B, M", [(2, 0), (0, 5)])
def test_triton_empty(B, M):
    sel = _selector(32, 2)
    S, weights, dscore, dprob = _inputs(B, M, 32, 2, torch.float32, "soft")
    got = _grads(_op("triton", 2), S, weights, list(sel.op_weights()), dscore, dprob)
    want = _grads(_op("reference", 2), S, weights, list(sel.op_weights()), dscore, dprob)
    for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_triton_poisoned_buffers_and_determinism(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: no unwritten element may leak into a result; two runs
    give bitwise the same outputs and gradients (no atomics)."""
    sel = _selector(64, 4)
    S, weights, dscore, dprob = _inputs(2, 40, 64, 4, torch.float32)
    params = list(sel.op_weights())
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", poisoned)
    runs = [_grads(_op("triton", 4), S, weights, params, dscore, dprob) for _ in range(2)]
    monkeypatch.setattr(torch, "empty", empty)
    a, b = (r[:2] + tuple(r[2]) for r in runs)
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)
    want = _oracle(sel, S, weights, dscore, dprob)
    _assert_close(runs[0][0], want[0], torch.float32, "score")
    for name, g, w in zip(NAMES[2:], runs[0][2][2:], want[2][2:]):
        _assert_close(g, w, torch.float32, name)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_triton_strided_tokens():
    """S as a view of wider rows (train_scores passes x[:, prefix:], rows of a larger buffer)."""
    sel = _selector(32, 2)
    S, weights, dscore, dprob = _inputs(2, 9, 32, 2, torch.float32)
    wide = torch.randn(2, 10, 40)
    wide[:, 1:, 4:36] = S
    view = wide[:, 1:, 4:36]
    assert not view.is_contiguous()
    params = list(sel.op_weights())
    got = _grads(_op("triton", 2), view, weights, params, dscore, dprob)
    want = _grads(_op("triton", 2), S, weights, params, dscore, dprob)
    for x, y in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert torch.equal(x, y)


@requires_triton_interpret
@pytest.mark.triton_interpret
def test_triton_rejects_wide_heads():
    args = _bad_args(S=torch.zeros(2, 5, 272), num_heads=2)
    sel = TokenSelector(272, 2)
    args.update(zip(list(args)[3:], (p.detach() for p in sel.op_weights())))
    with pytest.raises(ValueError, match="head dims"):
        ops.selector_train(**args, backend="triton")


# --- GPU ------------------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, M, C, H", [(4, 196, 384, 6), (3, 75, 192, 3), (2, 123, 256, 2), (2, 49, 768, 6)])
def test_gpu_triton(B, M, C, H, dtype):
    sel = _selector(C, H)
    S, weights, dscore, dprob = _inputs(B, M, C, H, dtype)
    params = [p.cuda() for p in sel.op_weights()]
    score, prob, grads = _grads(_op("triton", H), S.cuda(), weights.cuda(), params, dscore.cuda(), dprob.cuda())
    want_score, want_prob, want_grads = _oracle(sel, S, weights, dscore, dprob)
    _assert_close(score.cpu(), want_score, dtype, "score")
    _assert_close(prob.cpu(), want_prob, dtype, "prob")
    zero = weights.sum(1) == 0
    for name, g, w in zip(NAMES, grads, want_grads):
        g = g.cpu()
        if name == "dweights":
            g, w = g[~zero], w[~zero]
        _assert_close(g, w, dtype, name)


@requires_gpu
def test_gpu_train_scores_uses_the_op(monkeypatch):
    sel = _selector(384, 6)
    S, weights, _, _ = _inputs(2, 50, 384, 6, torch.float32, "soft")
    want = sel.train_scores(S, weights)
    calls = []
    real = ops.selector_train
    monkeypatch.setattr(ops, "selector_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = sel.cuda().train_scores(S.cuda(), weights.cuda())
    assert calls
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_forward_backward():
    """Under torch.compile the op is the composite front: the forward / backward schemas in the graph."""
    args = _op_args(B=2, M=5)
    S, weights, H, *params = args

    def loss(S_, w_):
        score, prob = ops.selector_train(S_, w_, H, *params)
        return (score[..., 0] * prob[..., 1]).sum()

    want = torch.autograd.grad(loss(S, weights), (S, weights))
    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(S, weights), (S, weights))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
