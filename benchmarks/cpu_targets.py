"""The CPU target in one run: every CPU backend against the reference backend, side by side, with the work counted.

The target (design section 7): each C++ CPU kernel at least 2x the reference backend on the same machine. This
program times, in one process and with the providers interleaved, the CPU backends of

  token_scores      C++ (csrc/cpu/token_scores_cpu.cpp)   DeiT-T/S/B first selector, 197 tokens, B 1 and 64
  prune_pack        C++ (csrc/cpu/prune_pack_cpu.cpp)     DeiT-S first stage 196 -> 121 (+ package), B 1 and 64
  varlen_attention  "cpu" (float32 SDPA over runs)         DeiT-S/B stages of ~123 / ~75 / ~31 tokens, B 64

against the reference backend on the same inputs (outputs compared before timing), and counts for each case the
floating-point operations and the bytes that must move. With the ceilings measured in the same run (float32
matmul rate, copy bandwidth) that gives the two numbers that say whether 2x is possible at all:

  ideal_ms            the case at 100% of the binding ceiling: max(flops / matmul rate, bytes / copy bandwidth)
  ideal_speedup       reference ms / ideal_ms: no kernel can beat the reference by more than this here
  pct_matmul_for_2x   the share of the matmul rate a kernel needs to be 2x the reference (over 100: impossible)

Counting (per image of n rows, C channels, H heads, d = C / H; f32 = 4 bytes):
  token_scores      2.75 C d flops per scored row (proj_in 2 d^2, mlp1's local half d^2 / 2, mlp2 d^2 / 4 per
                    head); bytes: the tokens once plus two float32 outputs per row.
  prune_pack        no arithmetic to speak of (the pooling's 2 C flops per dropped row); bytes: the tokens read,
                    the kept rows written, scores and indices.
  varlen_attention  4 n^2 d H flops (q k^T and p v); bytes: q, k, v read, out written.

    python benchmarks/cpu_targets.py [--threads N] [--rounds 3] [--quick]
Writes benchmarks/results/cpu_targets-<device>.csv. Timings on a CPU that other processes share are noisy: the
CSV records the 1-minute load average; each provider keeps its best median over the interleaved rounds.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_prune_pack  # noqa: E402
import bench_token_scores  # noqa: E402
import bench_varlen_attention  # noqa: E402
import common  # noqa: E402

from spvit_kernels import ops  # noqa: E402

TARGET = 2.0
F32 = 4


def token_scores_cases(batches):
    for label, C, H in bench_token_scores.WIDTHS:
        sel = bench_token_scores.make_selector(C, H, "cpu")
        w = sel.op_weights()
        for B in batches:
            x, cu = bench_token_scores.make_tokens(B, C, torch.float32, "cpu")
            rows = B * (bench_token_scores.TOKENS - 1)
            work = {"gflop": 2.75 * C * (C // H) * rows / 1e9,
                    "gbytes": (x.numel() * F32 + 2 * F32 * x.shape[0]) / 1e9}

            def run(backend, x=x, cu=cu, H=H, w=w):
                return ops.token_scores(x, cu, 0, H, *w, backend=backend)
            yield "token_scores", f"{label} 197 tokens", B, "cpu", run, work, (1e-4, 1e-4)


def prune_pack_cases(batches):
    stage, n, P, k = bench_prune_pack.STAGES[0]
    C = 384
    for B in batches:
        x, cu, score, prob = bench_prune_pack.make_inputs(B, n, P, C, torch.float32, "cpu")
        dropped = n - k
        work = {"gflop": 2 * C * dropped * B / 1e9,
                "gbytes": bench_prune_pack.moved_bytes(B, n, P, C, k, F32) / 1e9}

        def run(backend, x=x, cu=cu, score=score, prob=prob, P=P, k=k):
            return ops.prune_pack(x, cu, score, prob, P, "topk", num_keep=k, backend=backend)
        yield "prune_pack", f"DeiT-S {stage}", B, "cpu", run, work, (1e-5, 1e-5)


def varlen_cases(batch):
    d = bench_varlen_attention.HEAD_DIM
    for model, H in bench_varlen_attention.MODELS:
        for stage, center, seed in bench_varlen_attention.STAGES:
            qkv, cu, lengths = bench_varlen_attention.make_case(batch, center, H, d, torch.float32, "cpu", seed)
            work = {"gflop": sum(4 * n * n * d * H for n in lengths) / 1e9,
                    "gbytes": 4 * qkv.shape[0] * H * d * F32 / 1e9}
            q, k, v = qkv.unbind(1)
            m = max(lengths)

            def run(backend, q=q, k=k, v=v, cu=cu, m=m):
                return ops.varlen_attention(q, k, v, cu, max_seqlen=m, backend=backend)
            yield "varlen_attention", f"{model} {stage}", batch, "cpu", run, work, (1e-4, 1e-4)


def measure(cases, rounds, ceilings):
    matmul = ceilings["matmul_float32_TFLOPs"] * 1e3  # GFLOP/s
    copy = ceilings["copy_GBps"]
    rows = []
    for op, shape, B, fast, run, work, (atol, rtol) in cases:
        providers = {"reference": lambda: run("reference"), fast: lambda: run(fast)}
        with torch.no_grad(), ops.unchecked_seqlens():
            outs = {name: fn() for name, fn in providers.items()}
            common.assert_close_providers(outs, "reference", atol=atol, rtol=rtol)
            times = {}
            for _ in range(rounds):
                for name, fn in providers.items():
                    times[name] = min(times.get(name, float("inf")), common.time_ms(fn, "cpu"))
        ideal_ms = max(work["gflop"] / matmul, work["gbytes"] / copy) * 1e3
        ref_ms = times["reference"]
        for name, ms in times.items():
            rows.append({
                "op": op, "shape": shape, "B": B, "provider": name, "ms": round(ms, 4),
                "gflop": round(work["gflop"], 5), "gbytes": round(work["gbytes"], 5),
                "GFLOPs": round(work["gflop"] / ms * 1e3, 1), "pct_matmul": round(100 * work["gflop"] / ms * 1e3 / matmul, 1),
                "GBps": round(work["gbytes"] / ms * 1e3, 2), "pct_copy": round(100 * work["gbytes"] / ms * 1e3 / copy, 1),
                "speedup_vs_reference": round(ref_ms / ms, 2),
                "target": TARGET if name != "reference" else "",
                "met": ("yes" if ref_ms / ms >= TARGET else "no") if name != "reference" else "",
                "ideal_ms": round(ideal_ms, 4), "ideal_speedup": round(ref_ms / ideal_ms, 2),
                "pct_matmul_for_2x": round(100 * TARGET * work["gflop"] / ref_ms * 1e3 / matmul, 1),
            })
            r = rows[-1]
            print(f"{op:>16} {shape:<22} B={B:<3} {name:>9}: {ms:9.3f} ms  {r['GFLOPs']:7.1f} GFLOP/s "
                  f"({r['pct_matmul']:5.1f}% matmul)  {r['GBps']:6.2f} GB/s  x{r['speedup_vs_reference']:5.2f}"
                  + (f"  [ideal x{r['ideal_speedup']}, 2x needs {r['pct_matmul_for_2x']}% of matmul]"
                     if name != "reference" else ""), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, best median kept")
    ap.add_argument("--quick", action="store_true", help="B 1 only (token_scores, prune_pack), varlen B 8, 1 round")
    ap.add_argument("--name", default="cpu_targets", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    batches = [1] if args.quick else [1, 64]
    for op in ("token_scores", "prune_pack", "varlen_attention"):
        if "cpu" not in ops.available_backends(op):
            sys.exit(f"the 'cpu' backend of {op} is not usable here (is the extension built?)")
    ceilings = common.measure_ceilings("cpu")
    print(f"device {common.device_label('cpu')}  threads {torch.get_num_threads()}  ceilings {ceilings}")
    cases = [*token_scores_cases(batches), *prune_pack_cases(batches), *varlen_cases(8 if args.quick else 64)]
    rows = measure(cases, rounds, ceilings)
    meta = dict(ceilings)
    meta.update({"rounds": rounds, "quick": args.quick, "target": f"{TARGET}x the reference backend",
                 "loadavg_1min": f"{os.getloadavg()[0]:.2f} (other processes share this CPU)"})
    common.write_csv(args.name, "cpu", rows, extra_meta=meta)
    return rows


if __name__ == "__main__":
    main()
