"""Triton GEMMs with GELU in their epilogues: a transformer MLP, fc2(gelu(fc1(h))), forward and backward.

    out, u, g = gelu_mlp_fwd_triton(h, w1, b1, w2, b2)
    dh, dw1, db1, dw2, db2 = gelu_mlp_bwd_triton(dout, h, u, g, w1, b1, w2, b2)

    h:        (M, C) float32 / float16 / bfloat16 contiguous (the tokens, normed).
    w1 (F, C), b1 (F,) or None, w2 (C_out, F), b2 (C_out,) or None: any float dtype, rounded to h's dtype for
              the products (as autocast casts them); their gradients come back in their own dtypes.
    u, g:     (M, F) in h's dtype: fc1's output and gelu(u), kept for backward.
    out:      (M, C_out) in h's dtype.

gelu is the exact (erf) GELU of torch.nn.GELU(); the formulas: spvit_kernels/reference/gelu_mlp.py.

Why: PyTorch runs the MLP with a GELU pass between the linears (read u, write g: 4 bytes per hidden element in
bf16) and, backward, a GELU-backward pass (read dg and u, write du: 6 bytes). Here
    fc1       [u, g] = h @ w1^T + b1, gelu   one GEMM whose epilogue adds the bias, rounds u to h's dtype and
                                             writes both u and gelu(u) (2 bytes more than u alone, 2 fewer than
                                             the GELU pass);
    fc2 grad  du = (dout @ w2) * gelu'(u)    one GEMM whose epilogue reads u's tile and multiplies by GELU's
                                             derivative: neither dg nor the GELU-backward pass exists; the same
                                             epilogue sums its tile's columns, so db1 needs no pass over du
                                             (per-program float32 partials, added by PyTorch: no atomics).
The other products (out = g @ w2^T + b2, dw2 = dout^T g, dw1 = du^T h, dh = du @ w1) are PyTorch GEMMs
(cuBLAS on a GPU), and db2 a PyTorch reduction, as in the unfused MLP.

GELU is evaluated once per element of u (forward) and of du (backward), in the epilogue, never on an operand
tile: an operand is read by every program along the other output dimension, so a prologue would evaluate it
N / BLOCK_N times (and the kernel report showed its erf alone out-issuing the tensor cores about 9 to 1). Even
in the epilogue the GELU is not free: with K = C = 384 (DeiT-S) a 128 x 128 tile runs only 12 K steps, and
libdevice's erf (~30 instructions per element) made the epilogue about as long as the main loop. 16-bit outputs
therefore use the exp2-polynomial GELU and derivative of spvit_kernels/triton/gelu.py (errors <= 1e-6 and 1.3e-5,
below the 16-bit rounding of u, gelu(u) and du; POLY_GELU); float32 keeps the exact erf form.

Tiles: 16-bit operands 128 x 64 x 32 with 8 warps and 3 pipeline stages, grouped program order for L2 reuse
(GROUP_M tiles of M share each B panel): at most 127 registers on sm_80 (128 x 128 tiles took 170-187, one block
per SM), so a second block's K loop can keep the tensor cores busy while one block runs its epilogue; float32
64 x 64 x 32 with 4 warps (IEEE dots on the CUDA cores, as PyTorch's default matmul; TF32 when
torch.backends.cuda.matmul.allow_tf32 is set). Under TRITON_INTERPRET=1
with 16-bit operands the operands are upcast to float32 before the dot (UPCAST_DOTS: the interpreter's bfloat16
dot multiplies raw bits, see varlen_attention.py); the products are the same.
"""

import torch
import triton
import triton.language as tl

from .._triton_support import interpret_mode
from ..reference.gelu_mlp import bias_grad, cast_optional, no_autocast
from .gelu import gelu_erf, gelu_erf_and_grad, gelu_poly, gelu_poly_grad
from .varlen_attention import _dot_precision


@triton.jit
def _gelu(x, POLY: tl.constexpr):
    if POLY:
        return gelu_poly(x, False)
    return gelu_erf(x)


@triton.jit
def _gelu_grad(x, POLY: tl.constexpr):
    if POLY:
        return gelu_poly_grad(x)
    return gelu_erf_and_grad(x)[1]


@triton.jit
def _gelu_matmul_kernel(A, B, C, G, BIAS, AUX, DBP, M, N, K,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                        HAS_BIAS: tl.constexpr, GELU_OUT: tl.constexpr, DGELU: tl.constexpr, POLY_GELU: tl.constexpr,
                        BIAS_GRAD: tl.constexpr, STORE_C: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M, N) = A (M, K) @ B (K, N) [+ BIAS (N,)], float32 accumulation; GELU_OUT: also G = gelu(C as stored);
    DGELU: C = that product * gelu'(AUX) (AUX, G: C's strides); BIAS_GRAD: the column sums of C (before its
    rounding) of this program's BLOCK_M rows into row pid_m of DBP (cdiv(M, BLOCK_M), N) float32; STORE_C False:
    C is not written (with GELU_OUT: G only)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOTS:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    if DGELU:
        acc = acc * _gelu_grad(tl.load(AUX + offs, mask=mask, other=0.0).to(tl.float32), POLY_GELU)
    if BIAS_GRAD:
        tl.store(DBP + pid_m * N + rn, tl.sum(tl.where(mask, acc, 0.0), axis=0), mask=n_ok)
    out = acc.to(C.dtype.element_ty)
    if STORE_C:  # False: only G (a forward that keeps nothing for backward needs gelu(u) alone)
        tl.store(C + offs, out, mask=mask)
    if GELU_OUT:  # from u as stored (rounded), as PyTorch's GELU reads it
        tl.store(G + offs, _gelu(out.to(tl.float32), POLY_GELU).to(G.dtype.element_ty), mask=mask)


def launch_meta(dtype, *, interpret=False):
    """Tiles, warps and stages for operands of `dtype` (also used by spvit_kernels.kernel_report)."""
    if dtype == torch.float32:
        c = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
        warps, stages = 4, 3
    else:  # 128 x 64: <= 127 registers, so two blocks per SM on sm_80 (two to four on sm_90)
        c = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
        warps, stages = 8, 3
    c.update(PRECISION=_dot_precision(dtype), UPCAST_DOTS=interpret and dtype != torch.float32,
             POLY_GELU=dtype != torch.float32)
    return dict(constexprs=c, num_warps=warps, num_stages=stages)


def _matmul(a, b, out, *, bias=None, gelu_out=None, aux=None, bias_grad=False, store_out=True):
    """out (M, N) = a (M, K) @ b (K, N) [+ bias]; gelu_out: also gelu(out) into it; aux: out *= gelu'(aux);
    bias_grad: also returns out's column sums (N,) float32, from per-program partials (no atomics).
    a, b any strides; out, gelu_out, aux contiguous (M, N)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return torch.zeros(N, dtype=torch.float32, device=out.device) if bias_grad else None
    meta = launch_meta(a.dtype, interpret=interpret_mode())
    c = meta["constexprs"]
    m_tiles = triton.cdiv(M, c["BLOCK_M"])
    partial = torch.empty((m_tiles, N), dtype=torch.float32, device=out.device) if bias_grad else out
    grid = (m_tiles * triton.cdiv(N, c["BLOCK_N"]),)
    _gelu_matmul_kernel[grid](
        a, b, out, gelu_out if gelu_out is not None else out, bias if bias is not None else out,
        aux if aux is not None else out, partial, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, GELU_OUT=gelu_out is not None, DGELU=aux is not None, BIAS_GRAD=bias_grad,
        STORE_C=store_out,
        num_warps=meta["num_warps"], num_stages=meta["num_stages"], **c)
    return partial.sum(dim=0) if bias_grad else None


@no_autocast
def gelu_mlp_fwd_triton(h, w1, b1, w2, b2, for_backward=True):
    dt = h.dtype
    M, F = h.shape[0], w1.shape[0]
    g = torch.empty((M, F), dtype=dt, device=h.device)
    u = torch.empty_like(g) if for_backward else g  # without backward, u is never written
    _matmul(h, w1.to(dt).t(), u, bias=cast_optional(b1, dt), gelu_out=g, store_out=for_backward)
    out = torch.nn.functional.linear(g, w2.to(dt), cast_optional(b2, dt))
    if not for_backward:
        return out, h.new_empty((0,)), h.new_empty((0,))
    return out, u, g


@no_autocast
def gelu_mlp_bwd_triton(dout, h, u, g, w1, b1, w2, b2):
    dt = h.dtype
    d = dout.to(dt)
    w1c, w2c = w1.to(dt), w2.to(dt)
    du = torch.empty_like(u)
    # (M, C_out) @ (C_out, F), times gelu'(u); db1 = du's column sums from the same epilogue (du is not re-read)
    db1 = _matmul(d, w2c, du, aux=u, bias_grad=b1 is not None)
    dw2 = (d.t() @ g).to(w2.dtype)
    dw1 = (du.t() @ h).to(w1.dtype)
    dh = du @ w1c
    return dh, dw1, db1.to(b1.dtype) if b1 is not None else du.new_empty((0,)), dw2, bias_grad(d, b2)
