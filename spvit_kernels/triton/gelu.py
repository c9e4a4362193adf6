"""GELU and its derivative for the Triton kernels: the exact erf form and a cheaper form of the same function.

    gelu_erf(x), gelu_erf_and_grad(x)     x Phi(x) through libdevice's erf, as F.gelu (float32 paths, references)
    gelu_poly(x, FAST), gelu_poly_grad(x) the same function through 0.5 erfc = exp2(polynomial): a few FMAs and
                                          one MUFU.EX2 (two for the derivative) instead of erf's ~30 instructions

GELU 0.5 x (1 + erf(x / sqrt 2)) = max(x, 0) - |x| t(|x|), t(a) = 0.5 erfc(a / sqrt 2) = P(X > a) for a standard
normal X. log2 t is smooth and concave on [0, inf), so t = exp2(p(a)) with a short polynomial p (fitted for the
smallest largest |gelu error| on [0, 12], minimax by Nelder-Mead): no division, no erf. p decreases to -inf, so
large |x| give t = 0 and gelu = max(x, 0) (never NaN for finite x).
 - FAST (degree 3): |gelu error| <= 5.5e-5 (float32 evaluation) -- below the rounding of a 16-bit result (fp16:
   4.9e-4 relative). 5 FP32 instructions (3 FFMA, FMNMX, FFMA) and a MUFU per element.
 - otherwise (degree 5): fit error <= 4.8e-7 (|gelu error| < 1e-6 with the rounding of the float32 result).
The derivative Phi(x) + x phi(x) uses Phi = 1 - t(|x|) (x >= 0) or t(|x|), degree 5: |error| <= 1.3e-5 (largest
at x = 0), below the rounding of a 16-bit result; phi = exp2(-x^2 log2(e) / 2) / sqrt(2 pi).
tests/test_token_scores_gelu.py holds the forms to these bounds against torch.erf in float64.
Constants are literals: a module-level float is not a constexpr inside @triton.jit.
"""

import triton
import triton.language as tl


@triton.jit
def gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_erf_and_grad(x):
    """(GELU(x), GELU'(x) = Phi(x) + x phi(x))."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return x * cdf, cdf + x * pdf


@triton.jit
def _log2_tail(a, FAST: tl.constexpr):
    """p(a) with 0.5 erfc(a / sqrt 2) ~= exp2(p(a)), a >= 0."""
    if FAST:
        p = -0.024885633771299334 * a - 0.49882000444411917
        p = p * a - 1.1292459972609055
        p = p * a - 1.0035317128568024
    else:
        p = -0.00047368191577049936 * a + 0.007087491395068797
        p = p * a - 0.05183580832652855
        p = p * a - 0.45998158699593983
        p = p * a - 1.150793983781294
        p = p * a - 1.0000364452660517
    return p


@triton.jit
def gelu_poly(x, FAST: tl.constexpr):
    a = tl.abs(x)
    return tl.maximum(x, 0.0) - a * tl.exp2(_log2_tail(a, FAST))


@triton.jit
def gelu_poly_grad(x):
    """GELU'(x) = Phi(x) + x phi(x), degree-5 tail."""
    t = tl.exp2(_log2_tail(tl.abs(x), False))
    cdf = tl.where(x >= 0, 1.0 - t, t)
    return cdf + x * tl.exp2(-0.7213475204444817 * x * x) * 0.3989422804014327
