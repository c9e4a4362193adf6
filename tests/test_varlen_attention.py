"""varlen_attention: attention inside each image of a ragged batch (design section 4).

Oracle: the reference backend on float64 copies of the inputs. Tolerances follow flash-attention's tests: a
backend's max error against the oracle may be at most ERR_MULT times (+ EPS) the error of plain PyTorch
attention computed in the same dtype (matmuls in that dtype, softmax in float32, P rounded to the dtype).
Triton runs here under TRITON_INTERPRET=1 (small shapes: the interpreter is slow); the tests marked gpu
run the compiled kernel on every head dim x dtype.
"""

import math

import pytest
import torch

from spvit_kernels import ops
from spvit_kernels.ops import _registry

from .utils import DTYPES, make_cu_seqlens, random_lengths, requires_gpu, requires_triton_interpret

HEAD_DIMS = [32, 64, 80, 96, 128]
ERR_MULT = 3.0
EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# A 197-token image (DeiT, 224px) next to a 1-token one, a 2-token one, an empty one and SPViT-like lengths.
LENGTHS_MIXED = [197, 1, 2, 31, 0, 5]
# Every tile-size bucket edge of the Triton heuristic (16 / 32 / 64 / 256).
LENGTHS_GPU = [197, 1, 2, 123, 75, 31, 0, 16, 17, 32, 33, 64, 65, 128, 129, 256, 3]


# --- helpers ----------------------------------------------------------------------------------------

def make_qkv(lengths, H, d, dtype, device="cpu"):
    """q, k, v as strided views of one packed (T, 3, H, d) qkv tensor, and cu_seqlens."""
    T = sum(lengths)
    qkv = torch.randn(T, 3, H, d, dtype=torch.float32, device=device).to(dtype)
    q, k, v = qkv.unbind(1)
    return q, k, v, make_cu_seqlens(lengths, device)


def oracle(q, k, v, cu, scale=None):
    return ops.varlen_attention(q.double(), k.double(), v.double(), cu, softmax_scale=scale, backend="reference")


def plain_torch_attention(q, k, v, cu, scale=None):
    """Attention as plain PyTorch computes it in q's dtype (float32 softmax); float64-free baseline."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (H, n, d)
            p = torch.softmax((qi @ ki.transpose(1, 2)).float() * scale, dim=-1).to(q.dtype)
            out[s:e] = (p @ vi).transpose(0, 1)
    return out


def assert_matches_oracle(out, q, k, v, cu, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "non-finite values in the output (unwritten or poisoned rows?)"
    ref = oracle(q, k, v, cu, scale)
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base = (plain_torch_attention(q, k, v, cu, scale).double() - ref).abs().max().item() if out.numel() else 0.0
    bound = ERR_MULT * base + EPS[q.dtype]
    assert err <= bound, f"max error {err:.3g} > {ERR_MULT} x plain PyTorch's {base:.3g} + {EPS[q.dtype]:g}"


def backends_here():
    return [b for b in ("reference", "cpu", "triton") if b in ops.available_backends("varlen_attention")
            and "cpu" in _registry._BACKENDS["varlen_attention"][b].device_types()]


# --- CPU backend ------------------------------------------------------------------------------------

def test_cpu_is_the_default_on_cpu():
    assert _registry.resolve("varlen_attention", None, "cpu").name == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_cpu_backend_matches_oracle(d, dtype):
    q, k, v, cu = make_qkv(LENGTHS_MIXED, 3, d, dtype)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="cpu"), q, k, v, cu)


@pytest.mark.parametrize("lengths", [
    pytest.param([7, 3, 7, 7, 3, 1], id="scattered-equal-lengths"),  # gathered groups
    pytest.param([31] * 5, id="all-equal"),                             # one strided view, no gather
])
def test_cpu_backend_groups(lengths):
    q, k, v, cu = make_qkv(lengths, 2, 64, torch.float32)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="cpu", softmax_scale=0.3), q, k, v, cu, 0.3)


def test_cpu_backend_257_images():
    lengths = random_lengths(257, 1, 40)
    lengths[100] = 197
    q, k, v, cu = make_qkv(lengths, 3, 64, torch.bfloat16)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="cpu"), q, k, v, cu)


def test_dispatcher_op_matches_default_backend():
    q, k, v, cu = make_qkv(LENGTHS_MIXED, 2, 32, torch.float32)
    out = torch.ops.spvit.varlen_attention(q, k, v, cu)
    assert_matches_oracle(out, q, k, v, cu)
    torch.testing.assert_close(out, ops.varlen_attention(q, k, v, cu), rtol=0, atol=0)


# --- layouts and API ----------------------------------------------------------------------------------

def _strided_layouts(T, H, d, dtype):
    """q, k, v with three different non-packed stride patterns (last dim contiguous)."""
    q = torch.randn(T, H, 2 * d, dtype=dtype)[..., :d]                    # row padding
    k = torch.randn(H, T, d, dtype=dtype).permute(1, 0, 2)                 # head-major
    v = torch.randn(T, 2, H, d, dtype=dtype)[:, 1]                         # slice of a pair
    return q, k, v


@pytest.mark.parametrize("backend", backends_here())
def test_strided_inputs(backend):
    lengths = [9, 1, 20]
    q, k, v = _strided_layouts(sum(lengths), 2, 32, torch.float32)
    cu = make_cu_seqlens(lengths)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend=backend), q, k, v, cu)


def test_empty_batch_rows():
    q, k, v, cu = make_qkv([0, 0], 2, 32, torch.float32)
    for backend in backends_here():
        assert ops.varlen_attention(q, k, v, cu, backend=backend).shape == (0, 2, 32)


def test_opcheck():
    q, k, v, cu = make_qkv([5, 1, 12], 2, 32, torch.float32)
    torch.library.opcheck(torch.ops.spvit.varlen_attention.default, (q, k, v, cu), {"max_seqlen": 12})
    torch.library.opcheck(torch.ops.spvit.varlen_attention.default, (q, k, v, cu))


def test_torch_compile_fullgraph():
    lengths = [13, 1, 7]
    q, k, v, cu = make_qkv(lengths, 2, 32, torch.float32)
    qkv = torch.stack([q, k, v], 1)

    def f(qkv, cu):
        q, k, v = qkv.unbind(1)
        a = torch.ops.spvit.varlen_attention(q, k, v, cu, 13, 0.25)
        b = ops.varlen_attention(q, k, v, cu, max_seqlen=13, softmax_scale=0.25)
        return a, b

    torch._dynamo.reset()
    a, b = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv, cu)
    assert_matches_oracle(a, q, k, v, cu, 0.25)
    assert_matches_oracle(b, q, k, v, cu, 0.25)


# --- bad input -------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("k-shape", lambda q, k, v, cu: (q, k[:-1], v, cu, {}), ValueError, "k must have the shape"),
    ("v-heads", lambda q, k, v, cu: (q, k, v[:, :1], cu, {}), ValueError, "v must have the shape"),
    ("v-dtype", lambda q, k, v, cu: (q, k, v.half(), cu, {}), TypeError, "v must have dtype"),
    ("cu-end", lambda q, k, v, cu: (q, k, v, torch.tensor([0, 5, 9], dtype=torch.int32), {}), ValueError,
     "cu_seqlens must end at"),
    ("cu-dtype", lambda q, k, v, cu: (q, k, v, cu.long(), {}), TypeError, "cu_seqlens"),
    ("cu-decreasing", lambda q, k, v, cu: (q, k, v, torch.tensor([0, 9, 4, 10], dtype=torch.int32), {}),
     ValueError, "cu_seqlens must be non-decreasing"),
    ("head-dim", lambda q, k, v, cu: (q[..., :24], k[..., :24], v[..., :24], cu, {}), ValueError, "head dim 24"),
    ("last-dim-stride", lambda q, k, v, cu: (q, k.transpose(1, 2).contiguous().transpose(1, 2), v, cu, {}),
     ValueError, "k must have a contiguous last dimension"),
    ("max-seqlen-short", lambda q, k, v, cu: (q, k, v, cu, {"max_seqlen": 3}), ValueError, "max_seqlen"),
    ("scale", lambda q, k, v, cu: (q, k, v, cu, {"softmax_scale": float("nan")}), ValueError, "softmax_scale"),
]


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case, backend):
    _, make, exc, pattern = case
    q, k, v, cu = make_qkv([6, 4], 2, 32, torch.float32)
    q2, k2, v2, cu2, kw = make(q, k, v, cu)
    with pytest.raises(exc, match=pattern):
        ops.varlen_attention(q2, k2, v2, cu2, backend=backend, **kw)


def test_bad_input_through_the_dispatcher():
    q, k, v, cu = make_qkv([6, 4], 2, 32, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        torch.ops.spvit.varlen_attention(q, k, v, torch.tensor([0, 5, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="head dim"):
        torch.ops.spvit.varlen_attention(q[..., :16], k[..., :16], v[..., :16], cu)


# --- Triton kernel under the interpreter (CPU) -------------------------------------------------------

@requires_triton_interpret
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_interpret_dtypes(dtype):
    q, k, v, cu = make_qkv(LENGTHS_MIXED, 2, 64, dtype)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="triton"), q, k, v, cu)


@requires_triton_interpret
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_interpret_65_to_96_token_bucket(dtype):
    """SPViT's later stages (~75 tokens): the 32x32-tile bucket, several key tiles per image."""
    q, k, v, cu = make_qkv([75, 3, 66], 1, 32, dtype)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="triton"), q, k, v, cu)


@requires_triton_interpret
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_triton_interpret_head_dims(d):
    q, k, v, cu = make_qkv([40, 1, 2], 2, d, torch.float16)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="triton"), q, k, v, cu)


@requires_triton_interpret
def test_triton_interpret_257_images():
    lengths = random_lengths(257, 1, 6)
    lengths[3] = 0
    q, k, v, cu = make_qkv(lengths, 2, 32, torch.float32)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="triton"), q, k, v, cu)


@requires_triton_interpret
def test_triton_interpret_small_tiles_and_head_groups():
    """16x16 tiles: several query and key tiles per image; 2 heads per program with H = 3 (one idle slot)."""
    from spvit_kernels.triton.varlen_attention import VarlenConfig, config_override

    q, k, v, cu = make_qkv([40, 1, 17], 3, 32, torch.float32)
    with config_override(lambda n, d, dt: VarlenConfig(16, 16, num_warps=1, num_stages=1, HEADS_PER_PROG=2)):
        out = ops.varlen_attention(q, k, v, cu, backend="triton", softmax_scale=0.2)
    assert_matches_oracle(out, q, k, v, cu, 0.2)


@requires_triton_interpret
@pytest.mark.parametrize("max_seqlen", [None, 5], ids=["none", "underestimated"])
def test_triton_interpret_max_seqlen_unknown_or_low(max_seqlen):
    """The backend reads max_seqlen itself when None; a too-low value (trusted, unchecked cu_seqlens) still
    computes every row because each program strides over the remaining query tiles."""
    from spvit_kernels.ops.varlen_attention_backends import varlen_attention_triton

    q, k, v, cu = make_qkv([40, 3], 2, 32, torch.float32)
    out = varlen_attention_triton(q, k, v, cu, max_seqlen, 1 / math.sqrt(32))
    assert_matches_oracle(out, q, k, v, cu)


@requires_triton_interpret
def test_triton_interpret_64bit_offset_path(monkeypatch):
    """The OFFSETS_64 variant (taken when T * row stride >= 2**31), forced on a small batch."""
    from spvit_kernels.triton import varlen_attention as mod

    monkeypatch.setattr(mod, "_needs_64bit_offsets", lambda *args: True)
    q, k, v, cu = make_qkv([20, 1], 2, 32, torch.float32)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="triton"), q, k, v, cu)


def test_default_config_is_bucketed():
    import triton

    from spvit_kernels.triton.varlen_attention import default_config

    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for n in (1, 2, 16, 17, 31, 32, 33, 64, 65, 123, 197, 256, 1000):
                cfg = default_config(n, d, dtype)
                for b in (cfg.BLOCK_M, cfg.BLOCK_N):
                    assert b >= 16 and b & (b - 1) == 0
                assert cfg.num_warps in (1, 2, 4, 8) and cfg.num_stages >= 1
            # The length only picks a bucket: lengths inside one bucket share a compiled kernel.
            assert default_config(100, d, dtype) == default_config(197, d, dtype)
            assert default_config(65, d, dtype) == default_config(96, d, dtype)
            if dtype != torch.float32:  # 65-96 tokens (SPViT's ~75-token stages) are not padded to 128
                cfg = default_config(75, d, dtype)
                assert triton.cdiv(75, cfg.BLOCK_M) * cfg.BLOCK_M <= 96
                assert triton.cdiv(75, cfg.BLOCK_N) * cfg.BLOCK_N <= 96
            assert default_config(17, d, dtype) == default_config(32, d, dtype)


# --- offline compile for the GPU targets (no GPU needed) ---------------------------------------------

def _compile_offline(arch, dtype, d, n):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from spvit_kernels.triton import varlen_attention as mod

    fn = mod._varlen_attention_fwd_kernel
    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1: recompile the same Python function
        fn = JITFunction(fn.fn)
    cfg = mod.default_config(n, d, dtype)
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    signature = {a: ptr for a in ("Q", "K", "V", "O")}
    signature["CU_SEQLENS"] = "*i32"
    strides = [a for a in fn.arg_names if a.startswith("stride_")]
    signature.update({a: "i32" for a in strides + ["total_rows", "num_heads", "num_m_tiles"]})
    signature["qk_scale_log2"] = "fp32"
    const = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                 HEADS_PER_PROG=cfg.HEADS_PER_PROG, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                 UPCAST_DOTS=False, OFFSETS_64=False)
    signature.update({c: "constexpr" for c in const})
    # What the JIT sees at run time: 16-byte aligned pointers, strides that are multiples of 16.
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ["Q", "K", "V", "O", "CU_SEQLENS"] + strides}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(c),): val for c, val in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


OFFLINE_COMPILE_CASES = [(arch, dtype, d, n) for arch in (80, 90)
                         for dtype, d, n in ((torch.bfloat16, 64, 123), (torch.float16, 80, 31), (torch.float32, 128, 197))]


def _offline_compile_report():
    """Run in a fresh process without TRITON_INTERPRET: {case: shared bytes} for OFFLINE_COMPILE_CASES."""
    report = {}
    for arch, dtype, d, n in OFFLINE_COMPILE_CASES:
        kernel = _compile_offline(arch, dtype, d, n)
        assert kernel.asm["cubin"], "no cubin"
        report[f"sm_{arch} {dtype} d={d} n={n}"] = kernel.metadata.shared
    return report


def test_kernel_compiles_for_gpu_targets():
    """Lowers the kernel to cubins for sm_80 / sm_90 (what the interpreter never checks) and keeps each
    block's shared memory within an A100's 163 KiB. In a subprocess: the interpreter patches triton.language
    in this one."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = "import json; from tests.test_varlen_attention import _offline_compile_report as r; print(json.dumps(r()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode != 0 and last.startswith(("ImportError", "ModuleNotFoundError")):
        pytest.skip(f"offline Triton compile API not available in this Triton: {last}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == len(OFFLINE_COMPILE_CASES)
    for case, shared in report.items():
        assert shared <= 163 * 1024, f"{case}: {shared} bytes of shared memory"


# --- GPU ------------------------------------------------------------------------------------------

def _poison_cuda_allocator(shape, dtype):
    """Fill the caching allocator's next block of this size with NaN, so an unwritten output row shows."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@requires_gpu
def test_gpu_triton_is_the_default():
    assert _registry.resolve("varlen_attention", None, "cuda").name == "triton"


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_gpu_triton_matches_oracle(d, dtype):
    q, k, v, cu = make_qkv(LENGTHS_GPU, 6, d, dtype, "cuda")
    _poison_cuda_allocator(q.shape, dtype)
    out = ops.varlen_attention(q, k, v, cu, max_seqlen=max(LENGTHS_GPU), backend="triton")
    assert_matches_oracle(out, q, k, v, cu)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", [123, 75, 31])
def test_gpu_triton_257_images(center, dtype):
    lengths = random_lengths(257, center - 12, center + 12)
    lengths[0], lengths[1] = 197, 1
    q, k, v, cu = make_qkv(lengths, 6, 64, dtype, "cuda")
    _poison_cuda_allocator(q.shape, dtype)
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, backend="triton"), q, k, v, cu)


@requires_gpu
@pytest.mark.parametrize("d", [64, 80])
def test_gpu_triton_strided_and_scale(d):
    lengths = [197, 1, 50]
    q, k, v = (t.cuda() for t in _strided_layouts(sum(lengths), 3, d, torch.bfloat16))
    cu = make_cu_seqlens(lengths, "cuda")
    assert_matches_oracle(ops.varlen_attention(q, k, v, cu, softmax_scale=0.05, backend="triton"), q, k, v, cu, 0.05)


@requires_gpu
def test_gpu_float32_tf32_switch():
    """float32 follows torch.backends.cuda.matmul.allow_tf32 (the baseline is computed under the same switch)."""
    q, k, v, cu = make_qkv(LENGTHS_GPU, 4, 64, torch.float32, "cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            out = ops.varlen_attention(q, k, v, cu, backend="triton")
            assert_matches_oracle(out, q, k, v, cu)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@requires_gpu
def test_gpu_dispatcher_without_max_seqlen():
    """torch.ops.spvit.varlen_attention never reads cu_seqlens in its check; the backend syncs once instead."""
    q, k, v, cu = make_qkv(LENGTHS_MIXED, 2, 64, torch.float16, "cuda")
    assert_matches_oracle(torch.ops.spvit.varlen_attention(q, k, v, cu), q, k, v, cu)


@requires_gpu
def test_gpu_cuda_graph_capture():
    lengths = [197, 1, 123, 75, 31, 2]
    q, k, v, cu = make_qkv(lengths, 6, 64, torch.bfloat16, "cuda")
    qkv = torch.stack([q, k, v], 1)  # static input buffer
    sq, sk, sv = qkv.unbind(1)
    ops.varlen_attention(sq, sk, sv, cu, max_seqlen=197)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.varlen_attention(sq, sk, sv, cu, max_seqlen=197)
    qkv.copy_(torch.randn_like(qkv))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert_matches_oracle(out, sq, sk, sv, cu)


@requires_gpu
def test_gpu_capture_without_max_seqlen_raises():
    q, k, v, cu = make_qkv([5, 7], 2, 64, torch.float16, "cuda")
    ops.varlen_attention(q, k, v, cu, max_seqlen=7)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="max_seqlen must be given under CUDA graph capture"):
        with torch.cuda.graph(g):
            ops.varlen_attention(q, k, v, cu)


@requires_gpu
def test_gpu_torch_compile_fullgraph():
    q, k, v, cu = make_qkv([197, 1, 64], 6, 64, torch.bfloat16, "cuda")
    qkv = torch.stack([q, k, v], 1)

    def f(qkv, cu):
        q, k, v = qkv.unbind(1)
        return ops.varlen_attention(q, k, v, cu, max_seqlen=197)

    torch._dynamo.reset()
    assert_matches_oracle(torch.compile(f, fullgraph=True)(qkv, cu), q, k, v, cu)


@requires_gpu
def test_gpu_64bit_offsets():
    """T * row stride >= 2**31 (about 0.93M tokens of packed qkv with H 12, d 64): images past 2**31 elements
    (64-bit base pointers) and the OFFSETS_64 kernel variant."""
    H, d, n = 12, 64, 16
    T = (2**31 // (3 * H * d) // n + 1) * n
    qkv = torch.empty(T, 3, H, d, dtype=torch.bfloat16, device="cuda").normal_()
    q, k, v = qkv.unbind(1)
    cu = torch.arange(0, T + 1, n, dtype=torch.int32, device="cuda")
    out = ops.varlen_attention(q, k, v, cu, max_seqlen=n, backend="triton")
    tail = slice(T - 4 * n, T)
    cu_tail = torch.arange(0, 4 * n + 1, n, dtype=torch.int32, device="cuda")
    assert_matches_oracle(out[tail].contiguous(), q[tail], k[tail], v[tail], cu_tail)
    head = slice(0, 4 * n)
    assert_matches_oracle(out[head].contiguous(), q[head], k[head], v[head], cu_tail)


@requires_gpu
def test_gpu_eager_call_with_max_seqlen_does_not_synchronise():
    """Eager ops.varlen_attention with max_seqlen: no device-to-host copy of cu_seqlens (validation included)."""
    q, k, v, cu = make_qkv([197, 75, 1], 6, 64, torch.bfloat16, "cuda")
    ops.varlen_attention(q, k, v, cu, max_seqlen=197)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.varlen_attention(q, k, v, cu, max_seqlen=197)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_oracle(out, q, k, v, cu)


def test_validation_with_max_seqlen_leaves_gpu_seqlens_unread(monkeypatch):
    """The check itself: with max_seqlen given, cu_seqlens that are not on the CPU are never read back."""
    from spvit_kernels.ops import _validate

    seen = []
    monkeypatch.setattr(_validate, "read_seqlens", lambda cu, T, allow_sync=True, **kw: seen.append(allow_sync))
    q, k, v, cu = make_qkv([5, 3], 2, 32, torch.float32)
    meta = torch.empty_like(cu, device="meta")
    monkeypatch.setattr(_validate, "check_seqlens_meta", lambda *a: None)
    _validate.varlen_attention(q, k, v, meta, 5, None)
    _validate.varlen_attention(q, k, v, cu, 5, None)
    assert seen == [False, True]
