"""The polynomial erf GELU of the Triton kernels (spvit_kernels/triton/gelu.py: token_scores, gelu_mlp) and its
derivative against the exact GELU in float64.

`gelu_poly` has two forms, both 0.5 erfc = exp2(polynomial): the float32
tokens' degree 5 (documented |gelu error| < 1e-6: 4.8e-7 from the fit, the rest the float32 rounding of
x itself near |x| = 12) and the 16-bit tokens' degree 3 (documented |gelu error|
<= 5.5e-5). Both are run elementwise on a dense grid of [-12, 12] plus the large and tiny values a
dot output can take; the errors must stay within the documented bounds, large negative inputs must give 0
(to 1e-12) and large positive ones x itself (no NaN, no inf - inf). The derivative `gelu_poly_grad` (degree 5,
documented |error| <= 1.3e-5) likewise, with 0 and 1 beyond. On a GPU the same kernels run in CUDA.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from spvit_kernels.triton.gelu import gelu_poly_grad
from spvit_kernels.triton.token_scores import _gelu

from .utils import poison_like, requires_gpu, requires_triton_interpret

BLOCK = 1024
# (FAST_GELU, the largest |gelu error| allowed): the documented bounds, rounded up (room for the GPU's
# approximate exp2, MUFU.EX2, about 2 ulp).
GELU_BOUNDS = [(False, 1e-6), (True, 6e-5)]
GRAD_BOUND = 1.4e-5


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, n, FAST_GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, _gelu(x, FAST_GELU), mask=mask)


@triton.jit
def _gelu_grad_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, gelu_poly_grad(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def _inputs(device):
    grid = torch.linspace(-12.0, 12.0, 48_001, dtype=torch.float64)  # step 5e-4
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 40.0, -40.0, 1e4, -1e4, 1e30, -1e30, 3e38,
                          -3e38], dtype=torch.float64)
    x = torch.cat([grid, edges]).float()
    return x.to(device)


def _run(x, fast):
    y = poison_like(x)
    _gelu_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), FAST_GELU=fast, BLOCK=BLOCK)
    return y.cpu()


def _check(x, y, bound):
    x64 = x.cpu().double()
    exact = 0.5 * x64 * (1.0 + torch.erf(x64 / math.sqrt(2.0)))
    assert torch.isfinite(y).all()
    err = (y.double() - exact).abs()
    small = x64.abs() <= 12
    assert err[small].max().item() <= bound, f"largest |gelu error| {err[small].max().item():.3g} > {bound}"
    # Beyond, the exact values are x or (below float64's range) 0: x to the last bit, 0 to 1e-12.
    big = ~small
    torch.testing.assert_close(y[big], torch.where(x[big].cpu() > 0, x[big].cpu(), 0.0), atol=1e-12, rtol=0)


@requires_triton_interpret
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # p^8 = inf for large |x|, by design
@pytest.mark.parametrize("fast,bound", GELU_BOUNDS)
def test_gelu_within_documented_error(fast, bound):
    x = _inputs("cpu")
    _check(x, _run(x, fast), bound)


@requires_gpu
@pytest.mark.parametrize("fast,bound", GELU_BOUNDS)
def test_gelu_within_documented_error_gpu(fast, bound):
    x = _inputs("cuda")
    _check(x, _run(x, fast), bound)


def _check_grad(x, y):
    x64 = x.cpu().double()
    exact = 0.5 * (1.0 + torch.erf(x64 / math.sqrt(2.0))) + x64 * torch.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
    assert torch.isfinite(y).all()
    small = x64.abs() <= 12
    err = (y.double() - exact).abs()[small].max().item()
    assert err <= GRAD_BOUND, f"largest |gelu' error| {err:.3g} > {GRAD_BOUND}"
    big = ~small
    torch.testing.assert_close(y[big], (x[big].cpu() > 0).float(), atol=1e-12, rtol=0)


def _run_grad(x):
    y = poison_like(x)
    _gelu_grad_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), BLOCK=BLOCK)
    return y.cpu()


@requires_triton_interpret
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_gelu_grad_within_documented_error():
    x = _inputs("cpu")
    _check_grad(x, _run_grad(x))


@requires_gpu
def test_gelu_grad_within_documented_error_gpu():
    x = _inputs("cuda")
    _check_grad(x, _run_grad(x))
