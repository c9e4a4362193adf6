"""Offline resource report of the GPU kernels: compiled for sm_80 / sm_90 without a GPU, read from the SASS.

What it measures for each kernel and configuration (`KernelStats`):
  registers per thread, spill bytes (ptxas -v on the Triton PTX; for the CUDA C++ cubins, which ship no PTX,
  the count of local-memory instructions), stack and shared memory per block, theoretical occupancy
  (resident blocks and warps per SM from registers, shared memory, warps and the block limit), and SASS
  instruction counts: total, inside the innermost loops (the per-tile work), the widest global load and
  store in bits, and the tensor-core MMA instructions (HMMA on sm_80 / sm_90, HGMMA for sm_90 wgmma).

Triton kernels are lowered with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, which
needs Triton's bundled ptxas but no driver; the constexprs and launch options come from the launchers' own
`*_launch_meta` helpers, so the report compiles exactly what a launch would. TRITON_INTERPRET must be unset
(or 0) in the process: the interpreter replaces triton.language. Compiles are cached in memory per process
(`functools.lru_cache`) and on disk by Triton's own cache (~/.triton/cache).

Used by benchmarks/kernel_report.py (the full table as CSV) and tests/test_kernel_report.py (a subset).
"""

import dataclasses
import functools
import math
import os
import re
import subprocess
import tempfile

import torch

# Per-SM limits (CUDA C Programming Guide, "Compute capabilities" table): registers, threads, blocks, and
# shared memory per SM / the most one block may use; 1 KiB per block is reserved by the system.
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, blocks=32, smem_sm=164 * 1024, smem_block=163 * 1024),
    90: dict(regs=65536, threads=2048, blocks=32, smem_sm=228 * 1024, smem_block=227 * 1024),
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
EXTENSION_WARPS = 16

_TL_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@dataclasses.dataclass
class KernelStats:
    kernel: str
    config: str
    arch: int
    num_warps: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    blocks_per_sm: int
    occupancy: float  # resident warps / the SM's 64
    sass_total: int
    sass_loop: int  # instructions in the innermost loop bodies (0: no loop found)
    loop_fp32: int  # of those, on the FP32 pipe (FFMA, FMUL, FADD, FMNMX, FSEL, FSETP)
    loop_mufu: int  # of those, on the special-function unit (MUFU: exp2, rsqrt, ...)
    loops: int
    widest_load_bits: int
    widest_store_bits: int
    mma: int  # HMMA + HGMMA
    hgmma: int
    ffma: int
    mufu: int
    local_mem_instr: int  # LDL / STL

    def row(self):
        return dataclasses.asdict(self)


def nvidia_tool(name):
    """A CUDA binary tool (ptxas, nvdisasm, cuobjdump): Triton's bundled copy, else the CUDA toolkit's."""
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    candidates.append(os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", name))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"{name} not found (neither shipped with Triton nor in CUDA_HOME/bin)")


def occupancy(arch, num_warps, registers, shared_bytes):
    """(blocks per SM, resident-warp fraction) from the per-SM limits: the theoretical occupancy."""
    lim = SM_LIMITS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_threads = lim["threads"] // (32 * num_warps)
    by_smem = lim["smem_sm"] // (shared_bytes + 1024) if shared_bytes else lim["blocks"]
    blocks = min(by_regs, by_threads, by_smem, lim["blocks"])
    return blocks, blocks * num_warps / (lim["threads"] // 32)


# --- SASS parsing ----------------------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def sass_functions(sass_text):
    """{function name: [(address, opcode, operands)]} from nvdisasm / cuobjdump -sass text."""
    funcs, cur, labels = {}, None, {}
    for line in sass_text.splitlines():
        m = re.match(r"^\s*Function : (\S+)\s*$", line) or re.match(r"^\.text\.(\S+):\s*$", line)
        if m:
            name = m.group(1)
            cur = funcs.setdefault(name, {"instr": [], "labels": {}})
            continue
        if cur is None:
            continue
        lm = _LABEL.match(line)
        if lm:
            cur["labels"][lm.group(1)] = len(cur["instr"])
            continue
        im = _INSTR.search(line)
        if im:
            cur["instr"].append((int(im.group(1), 16), im.group(2), im.group(3)))
    return funcs


def _innermost_loops(instr, labels):
    """[(first, last)] instruction index ranges of backward branches that contain no other loop."""
    loops = []
    for i, (_, op, args) in enumerate(instr):
        if op.startswith("BRA"):
            t = _TARGET.search(args)
            if t and t.group(1) in labels and labels[t.group(1)] <= i:
                loops.append((labels[t.group(1)], i))
    return [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]


_FP32_PIPE = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP")


def _width(op, default=32):
    for w in (128, 64, 16, 8):
        if f".{w}" in op or f".U{w}" in op or f".S{w}" in op:
            return w
    return default


def sass_stats(instr, labels):
    """Instruction counts of one function's SASS (see KernelStats)."""
    real = [(a, op, args) for a, op, args in instr if op not in ("NOP",)]
    loops = _innermost_loops(instr, labels)
    in_loop = {i for a, b in loops for i in range(a, b + 1)}  # two back edges may share a body
    loop_n = sum(1 for i in in_loop if instr[i][1] != "NOP")
    loop_ops = [instr[i][1] for i in in_loop]
    loop_fp32 = sum(op.startswith(_FP32_PIPE) for op in loop_ops)
    loop_mufu = sum(op.startswith("MUFU") for op in loop_ops)
    loads = [_width(op) for _, op, _ in real if op.startswith(("LDG", "LDGSTS"))]
    stores = [_width(op) for _, op, _ in real if op.startswith("STG")]
    ops = [op for _, op, _ in real]
    return dict(
        sass_total=len(real), sass_loop=loop_n, loop_fp32=loop_fp32, loop_mufu=loop_mufu, loops=len(loops),
        widest_load_bits=max(loads, default=0), widest_store_bits=max(stores, default=0),
        mma=sum(op.startswith(("HMMA", "HGMMA")) for op in ops), hgmma=sum(op.startswith("HGMMA") for op in ops),
        ffma=sum(op.startswith("FFMA") for op in ops), mufu=sum(op.startswith("MUFU") for op in ops),
        local_mem_instr=sum(op.startswith(("LDL", "STL")) for op in ops))


def _run(args, data=None, suffix=""):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in" + suffix)
        if data is not None:
            with open(path, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
        out = subprocess.run([a if a != "{}" else path for a in args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {out.stderr[-2000:]}")
    return out.stdout + out.stderr


def resource_usage(binary_path):
    """{function: dict(REG, STACK, SHARED, LOCAL)} from `cuobjdump -res-usage` (per sm arch for a fatbin)."""
    text = _run([nvidia_tool("cuobjdump"), "-res-usage", binary_path])
    usage, arch, func = {}, None, None
    for line in text.splitlines():
        am = re.search(r"arch = sm_(\d+)", line)
        if am:
            arch = int(am.group(1))
        fm = re.match(r"\s*Function (\S+):", line)
        if fm:
            func = fm.group(1)
            continue
        if func and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            usage[(arch, func)] = {k: int(v) for k, v in vals.items()}
            func = None
    return usage


def ptxas_spills(ptx, arch):
    """Spill store + load bytes that ptxas reports for the PTX (ptxas -v)."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)  # sm_90a where Triton uses wgmma
    target = target.group(1) if target else f"sm_{arch}"
    text = _run([nvidia_tool("ptxas"), "-v", f"-arch={target}", "{}", "-o", os.devnull], ptx, ".ptx")
    return sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))


# --- Triton kernels ------------------------------------------------------------------------------------


def _jit_function(fn):
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def compile_triton(fn, arch, arg_types, constexprs, divisible, num_warps, num_stages):
    """Compile a @triton.jit function for sm_<arch> offline. arg_types: {arg: "*bf16" / "i32" / "fp32"};
    divisible: the args a launch sees as multiples of 16 (aligned pointers, strides)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(fn)
    names = fn.arg_names
    signature = dict(arg_types)
    signature.update({c: "constexpr" for c in constexprs})
    missing = [a for a in names if a not in signature]
    if missing:
        raise ValueError(f"compile_triton: no type for {missing}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn, signature, constexprs={(names.index(c),): v for c, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def triton_stats(name, config, arch, kernel, num_warps):
    """KernelStats of a compiled Triton kernel (its cubin, PTX and metadata)."""
    fname = kernel.metadata.name
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = resource_usage(cubin)
        sass = _run([nvidia_tool("nvdisasm"), "-c", cubin])
    res = next(v for (a, f), v in usage.items() if f == fname)
    funcs = sass_functions(sass)
    body = funcs.get(fname) or next(iter(funcs.values()))
    shared = int(kernel.metadata.shared)
    blocks, occ = occupancy(arch, num_warps, res["REG"], shared)
    return KernelStats(kernel=name, config=config, arch=arch, num_warps=num_warps, registers=res["REG"],
                       spill_bytes=ptxas_spills(kernel.asm["ptx"], arch), stack_bytes=res.get("STACK", 0),
                       shared_bytes=shared, blocks_per_sm=blocks, occupancy=round(occ, 4),
                       **sass_stats(body["instr"], body["labels"]))


@functools.lru_cache(maxsize=None)
def varlen_attention_stats(arch, dtype, head_dim, max_seqlen):
    """The Triton varlen_attention kernel in the config the front end picks for (max_seqlen, d, dtype)."""
    from .triton import varlen_attention as mod

    meta = mod.launch_meta(max_seqlen, head_dim, dtype, interpret=False, offsets_64=False)
    fn = _jit_function(mod._varlen_attention_fwd_kernel)
    ptr = _TL_PTR[dtype]
    types = {a: ptr for a in ("Q", "K", "V", "O")}
    types["CU_SEQLENS"] = "*i32"
    strides = [a for a in fn.arg_names if a.startswith("stride_")]
    types.update({a: "i32" for a in strides + ["total_rows", "num_heads", "num_m_tiles"]})
    types["qk_scale_log2"] = "fp32"
    k = compile_triton(fn, arch, types, meta["constexprs"], ["Q", "K", "V", "O", "CU_SEQLENS"] + strides,
                       meta["num_warps"], meta["num_stages"])
    c = meta["constexprs"]
    config = (f"{str(dtype).replace('torch.', '')} d={head_dim} n<={max_seqlen} BLOCK_M={c['BLOCK_M']} "
              f"BLOCK_N={c['BLOCK_N']} warps={meta['num_warps']} stages={meta['num_stages']}")
    return triton_stats("varlen_attention", config, arch, k, meta["num_warps"]), c


POLICY_KERNELS = {"fwd": "_policy_attention_fwd_kernel", "bwd_kv": "_policy_attention_bwd_kv_kernel",
                  "bwd_q": "_policy_attention_bwd_q_kernel"}


@functools.lru_cache(maxsize=None)
def policy_attention_stats(arch, dtype, head_dim, seqlen, part):
    """One of the Triton policy_attention kernels (part: "fwd", "bwd_kv", "bwd_q") in the config its launcher
    picks for (seqlen, d, dtype)."""
    from .triton import policy_attention as mod

    cfg, c = mod._meta(seqlen, head_dim, dtype, backward=part != "fwd")
    c = dict(c, UPCAST_DOTS=False)
    fn = _jit_function(getattr(mod, POLICY_KERNELS[part]))
    ptr = _TL_PTR[dtype]
    types = {}
    for a in fn.arg_names:
        if a in c:
            continue
        if a in ("Q", "K", "V", "O", "DO"):
            types[a] = ptr
        elif a.isupper():
            types[a] = "*fp32"
        elif a.startswith("stride_") or a in ("seqlen", "num_heads"):
            types[a] = "i32"
        else:
            types[a] = "fp32"
    divisible = [a for a in types if types[a].startswith("*")] + [a for a in types if a.startswith("stride_")]
    k = compile_triton(fn, arch, types, c, divisible, cfg.num_warps, cfg.num_stages)
    config = (f"{str(dtype).replace('torch.', '')} d={head_dim} n={seqlen} BLOCK_M={cfg.BLOCK_M} "
              f"BLOCK_N={cfg.BLOCK_N} warps={cfg.num_warps} stages={cfg.num_stages}")
    return triton_stats(f"policy_attention_{part}", config, arch, k, cfg.num_warps), c


SELECTOR_TRAIN_KERNELS = ("_fwd_head_kernel", "_fwd_combine_kernel", "_bwd_combine_kernel", "_bwd_head_kernel")
_SELECTOR_TRAIN_INTS = ("M", "H", "rows_per_chunk", "n_chunks", "n_tiles")


@functools.lru_cache(maxsize=None)
def selector_train_stats(arch, dtype, channels, num_heads, seqlen, kernel):
    """One of the Triton selector_train kernels (SELECTOR_TRAIN_KERNELS) as a launch for (C, H, S's dtype, M rows)
    compiles it: S and dS in the tokens' dtype, everything else float32 (the selector's weights included)."""
    from .triton import selector_train as mod

    meta = mod.launch_meta(channels, num_heads, dtype, seqlen, arch=arch)[kernel]
    c = meta["constexprs"]
    fn = _jit_function(getattr(mod, kernel))
    types = {}
    for a in fn.arg_names:
        if a in c:
            continue
        if a in ("S", "DS"):
            types[a] = _TL_PTR[dtype]
        elif a.startswith("stride_") or a in _SELECTOR_TRAIN_INTS:
            types[a] = "i32"
        elif a == "tiny":
            types[a] = "fp32"
        else:
            types[a] = "*fp32"
    divisible = [a for a in types if types[a].startswith("*")] + [a for a in types if a.startswith("stride_")]
    k = compile_triton(fn, arch, types, c, divisible, meta["num_warps"], 1)
    config = (f"{str(dtype).replace('torch.', '')} C={channels} H={num_heads} M={seqlen} "
              + " ".join(f"{key}={v}" for key, v in c.items() if key.startswith("BLOCK"))
              + f" dots={c['PRECISION']} warps={meta['num_warps']}")
    name = "selector_train" + kernel.replace("_kernel", "")
    return triton_stats(name, config, arch, k, meta["num_warps"]), c


ADD_LAYER_NORM_KERNELS = {"fwd": "_add_layer_norm_fwd_kernel", "bwd": "_add_layer_norm_bwd_kernel"}


@functools.lru_cache(maxsize=None)
def add_layer_norm_stats(arch, x_dtype, branch_dtype, out_dtype, channels, part, scaled=False):
    """One of the Triton add_layer_norm kernels (part: "fwd", "bwd") for a C-channel stream of x_dtype with a
    branch of branch_dtype and y in out_dtype (the training block under bf16 autocast: float32, bfloat16,
    bfloat16), affine, in the tile its launcher picks; the backward with the residual path's gradient; scaled:
    with a per-row branch_scale (stochastic depth in training)."""
    from .triton import add_layer_norm as mod

    meta = mod.launch_meta(channels, backward=part == "bwd")
    s_dtype = torch.promote_types(x_dtype, branch_dtype)
    if part == "fwd":
        ptrs = dict(X=x_dtype, BR=branch_dtype, W=torch.float32, BI=torch.float32, S=s_dtype, Y=out_dtype,
                    MEAN=torch.float32, RSTD=torch.float32)
        flags = dict(HAS_BRANCH=True, HAS_W=True, HAS_B=True)
    else:
        ptrs = dict(DY=out_dtype, DSUM=s_dtype, S=s_dtype, W=torch.float32, MEAN=torch.float32, RSTD=torch.float32,
                    DX=x_dtype, DBR=branch_dtype, DW=torch.float32, DB=torch.float32)
        flags = dict(HAS_DSUM=True, HAS_W=True, HAS_DBR=True, HAS_DW=True, HAS_DB=True)
    ptrs["SCALE"] = torch.float32
    flags["HAS_SCALE"] = scaled
    c = dict(flags, BLOCK_R=meta["BLOCK_R"], BLOCK_C=meta["BLOCK_C"])
    fn = _jit_function(getattr(mod, ADD_LAYER_NORM_KERNELS[part]))
    types = {a: _TL_PTR[dt] for a, dt in ptrs.items()}
    types.update({a: "i32" for a in fn.arg_names if a not in types and a not in c and a != "eps"})
    if part == "fwd":
        types["eps"] = "fp32"
    divisible = list(ptrs) + ["C"] * (channels % 16 == 0)
    k = compile_triton(fn, arch, types, c, divisible, meta["num_warps"], 1)
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    config = (f"x {name(x_dtype)} branch {name(branch_dtype)}{' scaled' if scaled else ''} y {name(out_dtype)} "
              f"C={channels} BLOCK_R={c['BLOCK_R']} BLOCK_C={c['BLOCK_C']} warps={meta['num_warps']}")
    return triton_stats(f"add_layer_norm_{part}", config, arch, k, meta["num_warps"]), c


# The GEMMs of gelu_mlp: (HAS_BIAS, GELU_OUT, DGELU, BIAS_GRAD, STORE_C) and the strides equal to 1 (which a
# launch specialises) for h (M, C), w1 (F, C), w2 (C_out, F), dout (M, C_out) as the launcher passes them.
GELU_MLP_GEMMS = {
    # [u, gelu(u)] = h w1^T + b1
    "fc1": ((True, True, False, False, True), dict(stride_ak=1, stride_bk=1, stride_cn=1)),
    "fc1_nograd": ((True, True, False, False, False), dict(stride_ak=1, stride_bk=1, stride_cn=1)),  # gelu(u) alone
    "fc2_dgrad": ((False, False, True, True, True), dict(stride_ak=1, stride_bn=1, stride_cn=1)),  # du, db1
}


@functools.lru_cache(maxsize=None)
def gelu_mlp_stats(arch, dtype, part):
    """One of gelu_mlp's Triton GEMMs (part: "fc1", "fc1_nograd", "fc2_dgrad"; GELU_MLP_GEMMS) with operands of
    dtype, in the tiles its launcher picks; sizes and the other strides multiples of 16."""
    from .triton import gelu_mlp as mod

    meta = mod.launch_meta(dtype)
    (has_bias, gelu_out, dgelu, bias_grad, store_c), unit = GELU_MLP_GEMMS[part]
    c = dict(meta["constexprs"], HAS_BIAS=has_bias, GELU_OUT=gelu_out, DGELU=dgelu, BIAS_GRAD=bias_grad,
             STORE_C=store_c, UPCAST_DOTS=False, **unit)
    fn = _jit_function(mod._gelu_matmul_kernel)
    ptr = _TL_PTR[dtype]
    types = dict(A=ptr, B=ptr, C=ptr, G=ptr, BIAS=ptr, AUX=ptr, DBP="*fp32")
    types.update({a: "i32" for a in fn.arg_names if a not in types and a not in c})
    divisible = [a for a in types if a not in c]
    k = compile_triton(fn, arch, types, c, divisible, meta["num_warps"], meta["num_stages"])
    dots = c["PRECISION"] if dtype == torch.float32 else "16-bit"  # PRECISION only matters for float32 operands
    config = (f"{part} {str(dtype).replace('torch.', '')} BLOCK_M={c['BLOCK_M']} BLOCK_N={c['BLOCK_N']} "
              f"BLOCK_K={c['BLOCK_K']} dots={dots} warps={meta['num_warps']} stages={meta['num_stages']}")
    return triton_stats(f"gelu_mlp_{part}", config, arch, k, meta["num_warps"]), c


@functools.lru_cache(maxsize=None)
def token_scores_kernels(arch, dtype, channels, num_heads):
    """[(kernel name, compiled kernel, launch meta)] of the Triton token_scores kernels (per-head, combine) as a
    launch for (C, H, dtype) compiles them."""
    from .triton import token_scores as mod

    metas = mod.launch_meta(channels, num_heads, dtype, interpret=False)
    out = []
    for kname, meta in metas.items():
        fn = _jit_function(getattr(mod, kname))
        types = {}
        for a in fn.arg_names:
            if a in meta["constexprs"]:
                continue
            types[a] = ("*fp32" if a.endswith("_ptr") else "i32")
        if "x_ptr" in types:
            types["x_ptr"] = _TL_PTR[dtype]
        if "cu_ptr" in types:
            types["cu_ptr"] = "*i32"
        divisible = [a for a in types if a.endswith("_ptr")] + [a for a in types if a.startswith("stride")]
        out.append((kname, compile_triton(fn, arch, types, meta["constexprs"], divisible, meta["num_warps"], 1),
                     meta))
    return out


@functools.lru_cache(maxsize=None)
def token_scores_stats(arch, dtype, channels, num_heads):
    """The Triton token_scores kernels (per-head, combine) as a launch for (C, H, dtype) compiles them."""
    out = []
    for kname, k, meta in token_scores_kernels(arch, dtype, channels, num_heads):
        c = meta["constexprs"]
        config = (f"{str(dtype).replace('torch.', '')} C={channels} H={num_heads} "
                  + " ".join(f"{key}={v}" for key, v in c.items() if key.startswith("BLOCK"))
                  + f" warps={meta['num_warps']}")
        out.append((triton_stats(f"token_scores{kname.replace('_kernel', '')}", config, arch, k,
                                 meta["num_warps"]), c))
    return out


def loop_lines(kernel):
    """{(source file, line): (instructions, FP32-pipe instructions)} of a compiled Triton kernel's innermost
    loop bodies, each SASS instruction attributed to the source line nvdisasm's line info gives it (the
    line of the @triton.jit function the compiler inlined it from, or of triton.language's own code)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = _run([nvidia_tool("nvdisasm"), "-c", "-g", cubin])
    where, cur = [], (None, None)
    for line in sass.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            cur = (m.group(1), int(m.group(2)))
        elif _INSTR.search(line):
            where.append(cur)
    body = sass_functions(sass).get(kernel.metadata.name) or next(iter(sass_functions(sass).values()))
    instr = body["instr"]
    if len(where) != len(instr):
        raise RuntimeError("loop_lines: line info does not match the instructions")
    out = {}
    in_loop = {i for a, b in _innermost_loops(instr, body["labels"]) for i in range(a, b + 1)}
    for i in sorted(in_loop):
        op = instr[i][1]
        if op == "NOP":
            continue
        n, fp32 = out.get(where[i], (0, 0))
        out[where[i]] = (n + 1, fp32 + op.startswith(_FP32_PIPE))
    return out


# --- CUDA C++ kernels of the extension ----------------------------------------------------------------


def extension_stats(so_path):
    """KernelStats of every kernel in the extension's sm_80 / sm_90 cubins (extracted with cuobjdump -xelf,
    read with nvdisasm and cuobjdump -res-usage). Spills are not separable from local arrays in a cubin:
    spill_bytes is -1 and local_mem_instr counts LDL / STL."""
    stats = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([nvidia_tool("cuobjdump"), "-xelf", "all", os.path.abspath(so_path)], cwd=tmp,
                       check=True, capture_output=True)
        for cubin in sorted(os.listdir(tmp)):
            m = re.search(r"sm_(\d+)", cubin)
            if not m or int(m.group(1)) not in SM_LIMITS:
                continue
            arch = int(m.group(1))
            path = os.path.join(tmp, cubin)
            usage = resource_usage(path)
            for fname, body in sass_functions(_run([nvidia_tool("nvdisasm"), "-c", path])).items():
                res = next((v for (_, f), v in usage.items() if f == fname), None)
                if res is None:
                    continue
                warps = EXTENSION_WARPS  # csrc/cuda/prune_pack_cuda.cu: kThreads = 512 for every kernel
                blocks, occ = occupancy(arch, warps, res["REG"], res.get("SHARED", 0))
                stats.append(KernelStats(
                    kernel=demangle(fname), config=fname, arch=arch, num_warps=warps, registers=res["REG"],
                    spill_bytes=-1, stack_bytes=res.get("STACK", 0), shared_bytes=res.get("SHARED", 0),
                    blocks_per_sm=blocks, occupancy=round(occ, 4), **sass_stats(body["instr"], body["labels"])))
    return stats


def demangle(name):
    """`spvit::prune_pack_kernel<c10::BFloat16, 8>` for a mangled kernel name (c++filt where present)."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name
    out = re.sub(r"\(anonymous namespace\)::", "", out or name)
    return re.sub(r"\(.*\)$", "", out).replace("void ", "")
