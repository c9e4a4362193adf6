"""Benchmark varlen_attention at SPViT stage shapes against every alternative the installed torch offers.

Shapes: B images (256) whose lengths are drawn around the three SPViT-DeiT stage lengths 123 / 75 / 31 (cls +
kept tokens + package tokens; uniform +-12, fixed seed; --jitter 0: all equal, as in top-k mode), H 6 (DeiT-S) and H 12 (DeiT-B), d 64; q, k, v are
strided views of one packed (T, 3, H, d) qkv, as the model's qkv Linear produces them.

Providers on a GPU (each checked against spvit's reference backend before anything is timed; one that is
missing or fails in this torch is reported as skipped with the reason):
  spvit_triton    this library's Triton kernel (max_seqlen given: no synchronisation)
  torch_varlen    torch.nn.attention.varlen.varlen_attn (FlashAttention varlen; torch >= 2.9)
  nested_sdpa     scaled_dot_product_attention on a jagged nested tensor (nested_tensor_from_jagged)
  padded_sdpa     pad to (B, max_len) + SDPA with a key-padding mask + unpad (padding inside the timing)
  flex_document   compiled FlexAttention over the packed tokens with a document mask (block mask built
                  once, outside the timing, which favours it)
  dense_masked    the official SPViT form: the full (B, 197 + packages) tensor with the pruned keys masked
                  (SDPA with a boolean key mask); only the kept rows are compared
On a CPU: spvit_cpu (the "cpu" backend), reference, per-image SDPA in the input dtype and in float32
(`--providers all` also runs the GPU list on CPU, small shapes, to check the benchmark code itself).

Counted once: FLOPs = 4 * sum(n_b^2) * H * d (QK^T and PV); bytes = q, k, v read + out written
(4 * T * H * d * element size). Reported as TFLOP/s and GB/s against the device's copy bandwidth and matmul
rate measured in the same run.

    python benchmarks/bench_varlen_attention.py [--device cpu|cuda] [--quick] [--batch B] [--dtype bfloat16]
                                               [--providers default|all] [--sweep] [--jitter J] [--threads N] [--rounds R]
--sweep (GPU) times candidate Triton tile configs per shape (the tuning hook of the kernel) and prints them.
Writes benchmarks/results/varlen_attention-<device>.csv and .png (varlen_attention_<dtype>-... for a dtype other
than the device's default, ..._equal_lengths with --jitter 0).
"""

import argparse
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from spvit_kernels import ops  # noqa: E402

# (label, centre length, packages carried by then, heads)
STAGES = [("stage1~123", 123, 1), ("stage2~75", 75, 2), ("stage3~31", 31, 3)]
MODELS = [("DeiT-S", 6), ("DeiT-B", 12)]
HEAD_DIM = 64
JITTER = 12
DENSE_TOKENS = 197


class Skip(Exception):
    """A provider that does not exist or cannot run in this torch."""


def make_case(B, center, H, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(center - JITTER, center + JITTER + 1, (B,), generator=gen)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    T = int(cu[-1])
    qkv = torch.randn(T, 3, H, d, generator=gen).to(dtype).to(device)
    return qkv, cu.to(device), lengths.tolist()


# --- providers: each is make(qkv, cu, lengths, info) -> zero-argument callable returning out (T, H, d) ---

def p_spvit(backend):
    def make(qkv, cu, lengths, info):
        q, k, v = qkv.unbind(1)
        m = max(lengths)
        return lambda: ops.varlen_attention(q, k, v, cu, max_seqlen=m, backend=backend)
    return make


def p_reference(qkv, cu, lengths, info):
    q, k, v = qkv.unbind(1)
    return lambda: ops.varlen_attention(q, k, v, cu, backend="reference")


def p_per_image_sdpa(upcast):
    def make(qkv, cu, lengths, info):
        q, k, v = qkv.unbind(1)
        bounds = cu.tolist()

        def run():
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            for s, e in zip(bounds[:-1], bounds[1:]):
                qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))
                if upcast:
                    qi, ki, vi = qi.float(), ki.float(), vi.float()
                out[s:e] = F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1)
            return out
        return run
    return make


def p_torch_varlen(qkv, cu, lengths, info):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise Skip(f"torch.nn.attention.varlen not in torch {torch.__version__} ({exc})")
    q, k, v = qkv.unbind(1)
    m = max(lengths)
    return lambda: varlen_attn(q, k, v, cu, cu, m, m)


def p_nested_sdpa(qkv, cu, lengths, info):
    if not hasattr(torch.nested, "nested_tensor_from_jagged"):
        raise Skip(f"torch.nested.nested_tensor_from_jagged not in torch {torch.__version__}")
    offsets = cu.long()

    def attend(copy):
        q, k, v = (torch.nested.nested_tensor_from_jagged(t.contiguous() if copy else t, offsets).transpose(1, 2)
                   for t in qkv.unbind(1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()  # (B, j, H, d) -> (T, H, d)

    try:
        attend(copy=False)
        return lambda: attend(copy=False)
    except Exception as exc:  # jagged values that are strided views may be refused: time with the copies
        print(f"  nested_sdpa: strided views refused ({type(exc).__name__}); timing with .contiguous() copies")
        return lambda: attend(copy=True)


def p_padded_sdpa(qkv, cu, lengths, info):
    B, L = len(lengths), max(lengths)
    T, _, H, d = qkv.shape
    dev = qkv.device
    img = torch.repeat_interleave(torch.arange(B, device=dev), torch.tensor(lengths, device=dev))
    pos = torch.arange(T, device=dev) - cu.long()[img]
    key_ok = (torch.arange(L, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None])
    mask = key_ok[:, None, None, :]  # (B, 1, 1, L): keys only

    def run():
        padded = qkv.new_zeros(B, L, 3, H, d)
        padded[img, pos] = qkv
        q, k, v = (t.transpose(1, 2) for t in padded.unbind(2))  # (B, H, L, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2)[img, pos]
    return run


def p_flex_document(qkv, cu, lengths, info):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Skip(f"FlexAttention not in torch {torch.__version__} ({exc})")
    T = qkv.shape[0]
    dev = qkv.device
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))

    def document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    block_mask = create_block_mask(document, None, None, T, T, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)

    def run():
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv.unbind(1))  # (1, H, T, d)
        return flex(q, k, v, block_mask=block_mask)[0].transpose(0, 1)
    return run


def p_dense_masked(qkv, cu, lengths, info):
    """The official form: all DENSE_TOKENS + packages rows stay; a key mask keeps the image's live rows."""
    B = len(lengths)
    N = DENSE_TOKENS + info["packages"]
    T, _, H, d = qkv.shape
    dev = qkv.device
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(B, N, 3, H, d, generator=gen).to(qkv.dtype).to(dev)
    img = torch.repeat_interleave(torch.arange(B, device=dev), torch.tensor(lengths, device=dev))
    pos = torch.arange(T, device=dev) - cu.long()[img]
    dense[img, pos] = qkv  # live rows first (their order does not change the result), dropped ones after
    mask = (torch.arange(N, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None])[:, None, None, :]
    q, k, v = (t.transpose(1, 2) for t in dense.unbind(2))  # (B, H, N, d) strided views

    def attend():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def run():
        return attend()
    run.compare = lambda: attend().transpose(1, 2)[img, pos]  # the kept rows, packed
    return run


GPU_PROVIDERS = [
    ("spvit_triton", p_spvit("triton")),
    ("torch_varlen", p_torch_varlen),
    ("nested_sdpa", p_nested_sdpa),
    ("padded_sdpa", p_padded_sdpa),
    ("flex_document", p_flex_document),
    ("dense_masked", p_dense_masked),
]
CPU_PROVIDERS = [
    ("spvit_cpu", p_spvit("cpu")),
    ("reference", p_reference),
    ("per_image_sdpa", p_per_image_sdpa(upcast=False)),
    ("per_image_sdpa_fp32", p_per_image_sdpa(upcast=True)),
]


def sweep_candidates(default):
    """Tile configs worth timing: BLOCK_M 16..128, BLOCK_N 16..64, warps that fit the tile, 1-2 stages."""
    from spvit_kernels.triton.varlen_attention import VarlenConfig

    cands = [default]
    for bm in (16, 32, 64, 128):
        for bn in (16, 32, 64):
            warps = (2, 4) if bm <= 32 else (4, 8)
            for w in warps:
                for st in (1, 2):
                    for hpp in ((1, 2) if bm <= 32 and st == 1 else (1,)):
                        c = VarlenConfig(bm, bn, w, st, hpp)
                        if c not in cands:
                            cands.append(c)
    return cands


def sweep_configs(shape, qkv, cu, lengths, device):
    """Time candidate Triton tile configs on this shape through the kernel's tuning hook; returns CSV rows."""
    from spvit_kernels.triton.varlen_attention import config_override, default_config

    q, k, v = qkv.unbind(1)
    m = max(lengths)
    default = default_config(m, q.shape[-1], q.dtype)
    ref = ops.varlen_attention(q, k, v, cu, max_seqlen=m, backend="triton")
    timed = []
    for c in sweep_candidates(default):
        try:
            with config_override(lambda *_: c):
                fn = lambda: ops.varlen_attention(q, k, v, cu, max_seqlen=m, backend="triton")  # noqa: E731
                torch.testing.assert_close(fn(), ref, atol=2e-2, rtol=2e-2)
                ms = common.time_ms(fn, device)
        except Exception as exc:  # e.g. out of shared memory or registers for this tile
            print(f"    {c}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
            continue
        timed.append((ms, c))
    timed.sort(key=lambda t: t[0])
    for ms, c in timed[:5]:
        print(f"    {ms:8.4f} ms  {c}" + ("  <- default" if c == default else ""))
    default_ms = next((ms for ms, c in timed if c == default), float("nan"))
    print(f"    default {default}: {default_ms:.4f} ms")
    return [dict(shape=shape, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps, num_stages=c.num_stages,
                 HEADS_PER_PROG=c.HEADS_PER_PROG, ms=round(ms, 4), is_default=c == default) for ms, c in timed]


def main():
    global JITTER
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="DeiT-S only, fewer images on CPU")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (GPU default 256, CPU 64)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) / float32 (CPU default) / float16")
    ap.add_argument("--providers", default="default", choices=["default", "all"])
    ap.add_argument("--sweep", action="store_true", help="GPU: time candidate Triton tile configs per shape")
    ap.add_argument("--jitter", type=int, default=JITTER,
                    help="lengths uniform in centre +- jitter (0: equal lengths, as in top-k mode)")
    ap.add_argument("--rounds", type=int, default=5, help="CPU: interleaved timing rounds per provider")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    JITTER = args.jitter
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    default_dtype = "bfloat16" if on_gpu else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    result_name = "varlen_attention" + ("" if str(dtype)[6:] == default_dtype else f"_{str(dtype)[6:]}") + \
        ("_equal_lengths" if JITTER == 0 else "")
    B = args.batch or (256 if on_gpu else (16 if args.quick else 64))
    providers = GPU_PROVIDERS if on_gpu else list(CPU_PROVIDERS)
    if not on_gpu and args.providers == "all":
        providers += [p for p in GPU_PROVIDERS if p[0] != "spvit_triton"]
        if "cpu" in ops.available_backends("varlen_attention") and os.environ.get("TRITON_INTERPRET") == "1":
            providers.append(("spvit_triton", p_spvit("triton")))
    models = MODELS[:1] if args.quick else MODELS

    ceil = common.measure_ceilings(device)
    copy_gbs = ceil["copy_GBps"]
    mm_key = [k for k in ceil if k.startswith("matmul")][0]
    print(f"device {common.device_label(device)}  dtype {dtype}  B {B}  ceilings {ceil}")
    rows, skipped, sweep_rows = [], {}, []
    for model, H in models:
        for label, center, packages in STAGES:
            qkv, cu, lengths = make_case(B, center, H, HEAD_DIM, dtype, device)
            T = qkv.shape[0]
            flops = 4 * sum(n * n for n in lengths) * H * HEAD_DIM
            nbytes = 4 * T * H * HEAD_DIM * qkv.element_size()
            info = {"packages": packages}
            shape = f"{model} {label}"
            print(f"\n{shape}: B {B}, H {H}, d {HEAD_DIM}, lengths {min(lengths)}..{max(lengths)} "
                  f"(mean {sum(lengths) / B:.1f}), T {T}")
            fns, results = {}, {}
            ref = ops.varlen_attention(*qkv.unbind(1), cu, backend="reference")
            results["reference"] = ref
            for name, make in providers:
                try:
                    fn = make(qkv, cu, lengths, info)
                    out = (getattr(fn, "compare", None) or fn)()
                    common.synchronize(device)
                    common.assert_close_providers({"reference": ref, name: out}, "reference",
                                                  atol=2e-2 if dtype != torch.float32 else 1e-4,
                                                  rtol=2e-2 if dtype != torch.float32 else 1e-4)
                except Skip as exc:
                    skipped[name] = str(exc)
                    print(f"  {name:20s} skipped: {exc}")
                    rows.append(dict(shape=shape, provider=name, status=f"skipped: {exc}"))
                    continue
                except Exception as exc:  # a provider that fails in this torch: report, don't crash
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    skipped[name] = msg
                    print(f"  {name:20s} skipped (failed): {msg}")
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                    rows.append(dict(shape=shape, provider=name, status=f"failed: {msg}"))
                    continue
                fns[name] = fn
            # On a CPU (shared, noisy) the providers are timed in interleaved rounds and the median round kept,
            # so that a slow spell of the machine does not land on one provider only.
            rounds = 1 if on_gpu else args.rounds
            samples = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    samples[name].append(common.time_ms(fn, device))
            timed = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
            alternatives = [ms for n, ms in timed.items() if not n.startswith("spvit")]
            best_alt = min(alternatives) if alternatives else float("nan")
            for name, ms in timed.items():
                tflops = flops / ms / 1e9
                gbs = nbytes / ms / 1e6
                row = dict(shape=shape, provider=name, status="ok", B=B, H=H, d=HEAD_DIM, dtype=str(dtype)[6:],
                           mean_len=round(sum(lengths) / B, 1), max_len=max(lengths), T=T, ms=round(ms, 4),
                           TFLOPs=round(tflops, 3), GBps=round(gbs, 1),
                           pct_copy_bw=round(100 * gbs / copy_gbs, 1),
                           pct_matmul=round(100 * tflops / ceil[mm_key], 1),
                           speedup_vs_best_alternative=round(best_alt / ms, 2) if alternatives else "")
                rows.append(row)
                print(f"  {name:20s} {ms:9.4f} ms  {tflops:8.3f} TFLOP/s  {gbs:8.1f} GB/s "
                      f"({row['pct_copy_bw']:5.1f}% of copy)  x{row['speedup_vs_best_alternative']} vs best alt")
            if args.sweep and on_gpu:
                sweep_rows += sweep_configs(shape, qkv, cu, lengths, device)
    path = common.write_csv(result_name, device, rows,
                            extra_meta={**ceil, "dtype": str(dtype), "batch": B, "jitter": JITTER,
                                        "rounds": 1 if on_gpu else args.rounds, "skipped": "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"})
    if sweep_rows:
        common.write_csv(result_name + "_sweep", device, sweep_rows, extra_meta={"dtype": str(dtype), "batch": B})
    ok = [r for r in rows if r.get("status") == "ok"]
    common.plot_bars(result_name, device, ok, x="shape", y="ms", group="provider", ylabel="ms (lower is better)",
                     title=f"varlen_attention, {str(dtype)[6:]}, B {B}, d {HEAD_DIM}")
    return path


if __name__ == "__main__":
    main()
