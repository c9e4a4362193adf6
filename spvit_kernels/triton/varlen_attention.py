"""Triton forward of variable-length (ragged batch) attention, tuned for short ViT sequences (1-256 tokens).

    out = varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, softmax_scale)

    q, k, v:     (T, H, d) float16 / bfloat16 / float32, last dim contiguous; any other strides (e.g. views
                 q = qkv[:, 0], k = qkv[:, 1], v = qkv[:, 2] of a packed (T, 3, H, d) qkv): read in place.
    cu_seqlens:  (B+1,) int32 on q's device; image b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1.
    max_seqlen:  int >= the longest image (sizes the grid, never a constexpr) or None (see below).
    out:         (T, H, d) contiguous, q's dtype.

Algorithm (FlashAttention-2 style forward, non-causal): one program owns one query tile of BLOCK_M rows of one
(image, head) -- or HEADS_PER_PROG heads in turn -- and streams the image's keys/values in tiles of BLOCK_N
rows, keeping the running row max m, the running denominator l and the output accumulator in float32
registers (online softmax with exp2 and the scale folded into log2(e)). The (n x n) score matrix is never
materialised. Rows and keys past the image's end are masked, so an image of 1 token and one of 197 tokens
can share a launch; head dims 80 and 96 are padded to a 128-wide tile with a mask on d.

Grid: a flat 1-D grid of num_m_tiles * B * ceil(H / HEADS_PER_PROG) programs, num_m_tiles =
ceil(max_seqlen / BLOCK_M). The query-tile index varies fastest, so the programs of one image and head run
side by side and re-read its K/V from L2. A program whose image is shorter than its tile exits at once. Each
program also strides over further query tiles (tile, tile + num_m_tiles, ...) up to the image's real length,
so an underestimated max_seqlen (possible only when cu_seqlens were trusted unchecked) still computes every
row; and every segment is clamped to [0, T], so bad cu_seqlens never read or write out of bounds. Image and
head base pointers are 64-bit scalars; offsets inside a tile are 32-bit unless T * row stride >= 2**31
(OFFSETS_64), which keeps per-element pointer arithmetic (and registers) small.

Lowering (checked offline without a GPU, Triton 3.8: benchmarks/kernel_report.py compiles every bucket for
sm_80 and sm_90, tests/test_kernel_report.py checks a subset): 128-bit vector loads and stores, cp.async pipelining of the K/V tiles for images > 64 tokens, wgmma on
sm_90 for the 64-row tiles and mma.sync for the 16/32-row ones; float32 (IEEE) uses FMA.

Tiles: BLOCK_M / BLOCK_N / num_warps / num_stages are constexpr buckets picked by `default_config` from
max_seqlen and d (no autotuning: the first call compiles one variant per bucket, and the sequence length
itself is only a runtime value read from cu_seqlens). `set_config_override` is the hook for tuning later
(benchmarks/bench_varlen_attention.py --sweep times candidate configs on a GPU).

Precision: float16 / bfloat16 inputs use tensor-core dots with float32 accumulation; the probabilities P are
rounded to the input dtype for the P @ V dot (as FlashAttention does). float32 inputs follow PyTorch's matmul
switch: with `torch.backends.cuda.matmul.allow_tf32` False (PyTorch's default) both dots run in IEEE float32
(input_precision="ieee", no tensor cores), so the result matches float32 PyTorch to ~1e-6; with it True they
use TF32 tensor cores (10-bit mantissa inputs), giving errors around 1e-3 relative, like any TF32 matmul.
Under TRITON_INTERPRET=1 (CPU) the dots run in numpy float32; with bfloat16 the interpreter (Triton 3.8)
stores bfloat16 as raw uint16 bits and its tl.dot multiplies those bits, so there (UPCAST_DOTS) the operands,
P already rounded to bfloat16, are upcast to float32 before each dot: the same products, exact in float32.

Synchronisation: none when max_seqlen is given (the op can be captured in a CUDA graph). With max_seqlen None
the longest image is read from cu_seqlens with one device-to-host copy; under CUDA graph capture that is
impossible and raises a ValueError asking for max_seqlen.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._triton_support import interpret_mode

_LOG2E = 1.0 / math.log(2.0)  # exp(x) = exp2(x * log2(e))


@dataclass(frozen=True)
class VarlenConfig:
    """Launch configuration: tile sizes (powers of two >= 16 for tl.dot), warps, pipeline stages."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    HEADS_PER_PROG: int = 1


def default_config(max_seqlen, head_dim, dtype):
    """Heuristic tiles for the sequence-length bucket, head dim and dtype (not autotuned: see module docstring).

    Why these: for ViT lengths (31 / 75 / 123 / 197 tokens) a tile that matches the length wastes the fewest
    masked rows, and small tiles give more programs (B*H is only ~1.5k at B=256, H=6). Up to 64 tokens one
    K/V tile covers the whole image, so there is no loop to pipeline (num_stages=1). 65-96 tokens (SPViT's
    later stages, ~75 tokens) use 32x32 tiles: 96x96 padded scores instead of 128x128. Longer images use
    64-row query tiles and 32-key tiles (224 keys for 197 tokens instead of 256), 2 pipeline stages.
    Every entry is compiled offline for sm_80 and sm_90 by benchmarks/kernel_report.py (Triton 3.8; results
    in benchmarks/results/kernel_report-offline-sm80-sm90.csv); tests/test_kernel_report.py checks that
    none of DeiT's spills and that the registers stay under the ceiling there. float32 runs its IEEE dots on CUDA cores (FMA), whose
    operands live in registers: smaller tiles. Not yet timed on a GPU: tune through `set_config_override`.
    """
    n = max(int(max_seqlen), 1)
    wide = triton.next_power_of_2(head_dim) > 64  # d = 80 / 96 / 128 use a 128-wide tile
    stages = 1 if n <= 64 else 2
    if dtype == torch.float32:
        if n <= 16:
            return VarlenConfig(BLOCK_M=16, BLOCK_N=16, num_warps=2, num_stages=1)
        # 32x16: 32x32 spills on sm_80 (d = 32: 96 registers, 24 bytes; d >= 80: 128 registers with 8 warps).
        # Two stages from 17 tokens on (one stage spills 24 bytes on sm_90 at d = 64).
        return VarlenConfig(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
    if n <= 16:
        return VarlenConfig(BLOCK_M=16, BLOCK_N=16, num_warps=1 if not wide else 2, num_stages=1)
    if n <= 32:
        return VarlenConfig(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if n <= 64:
        return VarlenConfig(BLOCK_M=64, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=1)
    if n <= 96:
        return VarlenConfig(BLOCK_M=32, BLOCK_N=32, num_warps=8 if wide else 4, num_stages=2)
    return VarlenConfig(BLOCK_M=64, BLOCK_N=32, num_warps=8 if wide else 4, num_stages=2)


_override = None


def set_config_override(fn):
    """Tuning hook: `fn(max_seqlen, head_dim, dtype) -> VarlenConfig | None` replaces the heuristic where it
    returns a config (None: use `default_config`). Pass None to remove. Returns the previous override."""
    global _override
    prev, _override = _override, fn
    return prev


@contextlib.contextmanager
def config_override(fn):
    """`with config_override(lambda n, d, dt: VarlenConfig(...)):` -- a scoped `set_config_override`."""
    prev = set_config_override(fn)
    try:
        yield
    finally:
        set_config_override(prev)


def get_config(max_seqlen, head_dim, dtype):
    """The config a launch uses: the override's answer if any, else the heuristic."""
    if _override is not None:
        cfg = _override(max_seqlen, head_dim, dtype)
        if cfg is not None:
            return cfg
    return default_config(max_seqlen, head_dim, dtype)


@triton.jit(do_not_specialize=["total_rows", "num_m_tiles"])
def _varlen_attention_fwd_kernel(
    Q, K, V, O, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_rows, num_heads, num_m_tiles, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % num_m_tiles
    rest = pid // num_m_tiles
    num_head_groups = tl.cdiv(num_heads, HEADS_PER_PROG)
    head_group = rest % num_head_groups
    b = rest // num_head_groups

    # Clamp the segment to [0, T]: unchecked cu_seqlens can give wrong numbers but no stray access.
    start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + b), 0), total_rows)
    end = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + b + 1), start), total_rows)
    seqlen = end - start

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # all true unless d (80, 96) was padded to BLOCK_D
    if OFFSETS_64:  # rows * stride inside one image can pass 2**31 (huge images only)
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    start64 = start.to(tl.int64)

    for hh in range(HEADS_PER_PROG):
        h = head_group * HEADS_PER_PROG + hh
        if h < num_heads:
            # Scalar 64-bit base pointers of this image and head; the tiles use small 32-bit offsets from
            # them (64-bit offsets per element would cost two registers each).
            h64 = h.to(tl.int64)
            q_img = Q + start64 * stride_qt + h64 * stride_qh
            k_img = K + start64 * stride_kt + h64 * stride_kh
            v_img = V + start64 * stride_vt + h64 * stride_vh
            o_img = O + start64 * stride_ot + h64 * stride_oh
            # Normally exactly one iteration (or none past the image's end); more only if max_seqlen was low.
            for m0 in range(tile * BLOCK_M, seqlen, num_m_tiles * BLOCK_M):
                rows = m0 + offs_m
                q_mask = (rows < seqlen)[:, None] & d_ok[None, :]
                q = tl.load(q_img + rows[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)

                m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                # K tile read transposed (BLOCK_D, BLOCK_N) so that q @ kt is a plain dot.
                kt_ptrs = k_img + offs_n[None, :] * stride_kt + offs_d[:, None]
                v_ptrs = v_img + offs_n[:, None] * stride_vt + offs_d[None, :]
                for n0 in range(0, seqlen, BLOCK_N):
                    col_ok = (n0 + offs_n) < seqlen
                    kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    if UPCAST_DOTS:  # TRITON_INTERPRET=1 with bfloat16 only, see below
                        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=DOT_PRECISION)
                    else:
                        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
                    # Every tile holds >= 1 valid key (n0 < seqlen), so the row max stays finite.
                    s = tl.where(col_ok[None, :], s * qk_scale_log2, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
                    p = tl.math.exp2(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None]
                    p = p.to(v.dtype)  # P rounded to the input dtype for the tensor-core dot
                    if UPCAST_DOTS:
                        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION)
                    else:
                        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
                    m_i = m_new
                    kt_ptrs += BLOCK_N * stride_kt
                    v_ptrs += BLOCK_N * stride_vt
                out = acc / l_i[:, None]
                tl.store(o_img + rows[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
                         mask=q_mask)


def _longest_segment(cu_seqlens):
    """max(cu_seqlens[1:] - cu_seqlens[:-1]) read on the host: one synchronisation on a GPU."""
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "max_seqlen must be given under CUDA graph capture: varlen_attention cannot read the longest "
            "image from cu_seqlens without a synchronisation")
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # float16/bfloat16: ignored (tensor cores on the 16-bit inputs); float32: TF32 allowed


def _needs_64bit_offsets(T, *tensors):
    """Whether a row offset inside one image (< T rows) times a row stride can reach 2**31."""
    return T * max(t.stride(0) for t in tensors) >= 2**31


def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """Backend entry (arguments already validated; softmax_scale a float). See the module docstring."""
    T, H, d = q.shape
    out = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    if max_seqlen is None:
        max_seqlen = _longest_segment(cu_seqlens)
    meta = launch_meta(max_seqlen, d, q.dtype, interpret=interpret_mode(),
                       offsets_64=_needs_64bit_offsets(T, q, k, v, out))
    c = meta["constexprs"]
    B = cu_seqlens.shape[0] - 1
    num_m_tiles = max(1, triton.cdiv(max_seqlen, c["BLOCK_M"]))
    grid = (num_m_tiles * B * triton.cdiv(H, c["HEADS_PER_PROG"]),)
    device_ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device_ctx:
        _varlen_attention_fwd_kernel[grid](
            q, k, v, out, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            T, H, num_m_tiles, float(softmax_scale) * _LOG2E,
            **c, num_warps=meta["num_warps"], num_stages=meta["num_stages"],
        )
    return out


def launch_meta(max_seqlen, head_dim, dtype, *, interpret, offsets_64):
    """The constexprs and launch options of one launch (also what spvit_kernels.kernel_report compiles)."""
    cfg = get_config(max_seqlen, head_dim, dtype)
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        HEADS_PER_PROG=cfg.HEADS_PER_PROG, DOT_PRECISION=_dot_precision(dtype),
        UPCAST_DOTS=dtype == torch.bfloat16 and interpret, OFFSETS_64=offsets_64)
    return dict(constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


__all__ = ["VarlenConfig", "config_override", "default_config", "get_config", "launch_meta",
           "set_config_override", "varlen_attention_triton"]
