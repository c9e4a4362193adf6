"""Where token_scores' per-head kernel spends its loop instructions, by source line (offline SASS, no GPU).

    python benchmarks/token_scores_sass_lines.py

Compiles the Triton per-head kernel as a DeiT-S launch would (C = 384, H = 6, d = 64) for bfloat16 and float16
on sm_80 and sm_90 (spvit_kernels/kernel_report.py), attributes every instruction of its row loops to the
source line nvdisasm's line info names, and groups the lines into parts of the computation: the GELU, the
LayerNorm, the row sums (triton.language's tl.sum), the dots, ... Counts are thread instructions per row and
head (loop instructions x threads / BLOCK_M rows), the unit of kernel_report's `sass_per_row_head`.

Writes benchmarks/results/token_scores_sass_lines-offline-sm80-sm90.csv (one row per source line, with its
part) and prints the per-part totals.
"""

import argparse
import collections
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CHANNELS, HEADS = 384, 6
ARCHS = (80, 90)
DTYPES = (torch.bfloat16, torch.float16)
# Functions of token_scores.py whose lines all belong to one part.
FUNCTION_PARTS = {"_gelu": "GELU", "_mma": "dots (HMMA, operand packing)", "_layer_norm_stats": "LayerNorm",
                  "_load_head_rows": "x loads"}


def _enclosing_function(src_lines, line):
    for i in range(line - 1, -1, -1):
        m = re.match(r"\s*def (\w+)", src_lines[i])
        if m:
            return m.group(1)
    return ""


def part_of(path, line, src_path, src_lines):
    """The part of the computation a source line belongs to."""
    if path is None or line is None:
        return "other"
    if os.path.abspath(path) != os.path.abspath(src_path):
        return "row sums (tl.sum)" if "triton" in path else "other"
    fn = _enclosing_function(src_lines, line)
    if fn in FUNCTION_PARTS:
        return FUNCTION_PARTS[fn]
    text = src_lines[line - 1]
    if "acc +=" in text or "acc = " in text:
        return "global mean accumulation"
    if "tl.store" in text or "tl.load" in text:
        return "scratch loads and stores"
    if "_gelu(" in text:
        return "dot epilogues (rstd, biases)"
    if "diff = " in text:
        return "logit difference"
    return "loop control and masks"


def rows_for(arch, dtype):
    from spvit_kernels import kernel_report as kr
    from spvit_kernels.triton import token_scores as mod

    src_path = mod.__file__
    with open(src_path) as f:
        src_lines = f.read().splitlines()
    kname, kernel, meta = kr.token_scores_kernels(arch, dtype, CHANNELS, HEADS)[0]
    assert kname == "_head_kernel"
    per_row = meta["num_warps"] * 32 / meta["constexprs"]["BLOCK_M"]
    rows = []
    for (path, line), (n, fp32) in sorted(kr.loop_lines(kernel).items(), key=lambda t: -t[1][0]):
        local = path is not None and os.path.abspath(path) == os.path.abspath(src_path)
        rows.append(dict(arch=arch, dtype=str(dtype).replace("torch.", ""),
                         part=part_of(path, line, src_path, src_lines),
                         source=(f"token_scores.py:{line}" if local else f"{os.path.basename(path or '?')}:{line}"),
                         code=src_lines[line - 1].strip()[:80] if local else "",
                         instr_per_row_head=round(n * per_row, 1), fp32_per_row_head=round(fp32 * per_row, 1)))
    return rows


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    rows = []
    for arch in ARCHS:
        for dtype in DTYPES:
            r = rows_for(arch, dtype)
            rows += r
            parts = collections.defaultdict(lambda: [0.0, 0.0])
            for x in r:
                parts[x["part"]][0] += x["instr_per_row_head"]
                parts[x["part"]][1] += x["fp32_per_row_head"]
            total = sum(v[0] for v in parts.values())
            total_fp32 = sum(v[1] for v in parts.values())
            print(f"sm_{arch} {dtype}: {total:.0f} per row and head, {total_fp32:.0f} on the FP32 pipe")
            for part, (n, fp32) in sorted(parts.items(), key=lambda t: -t[1][0]):
                print(f"  {n:7.0f} (FP32 {fp32:5.0f})  {part}")
    import triton

    common.write_csv("token_scores_sass_lines", "cpu", rows, label="offline-sm80-sm90",
                     extra_meta={"what": "offline compile (no GPU ran): Triton " + triton.__version__
                                 + f" with its bundled ptxas; per-head kernel, C={CHANNELS} H={HEADS}; "
                                 "thread instructions per row and head in the row loops, by source line"})


if __name__ == "__main__":
    main()
