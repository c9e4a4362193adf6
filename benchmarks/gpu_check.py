"""One call validates the GPU path on a machine that has a GPU: install, GPU tests, op benchmarks, end to end.

    python benchmarks/gpu_check.py [--budget 480] [--plan] [--dry-run]      (make gpu-check)

Made for a GPU machine lent for a single call of at most 10 minutes, without network, with torch, Triton and nvcc
preinstalled. The steps (PLAN below) run one after the other, each under its own time limit, inside a total
budget (default 8 minutes):
    install     pip install --no-build-isolation --no-deps -e .   (build for the GPU's own architecture)
    gpu tests   pytest -m gpu: every GPU kernel against its float64 reference, on the GPU
    ops         bench_token_scores / bench_prune_pack / bench_varlen_attention at the design targets' shapes
    end to end  throughput.py: DeiT-T/S/B bf16 batch 256, dense vs reference vs accelerated (top-k)
    train step  bench_train_step.py: SPViT-DeiT-S bf16 batch 64, paper form vs reference vs fused training step
Repetitions are what gets cut to fit (--quick flags and fewer timed runs), never the correctness checks: every
benchmark compares its providers before it times them, and the tests run whole. Each step's output goes to
benchmarks/results/gpu_check-<device>/<step>.log, the benchmarks write their usual CSVs under benchmarks/results/,
and summary.md there puts every figure beside its design target (docs/design.md section 7) and the modeled
figure (benchmarks/results/roofline-MODELED.csv), with device, versions, commit and date.

Without a GPU it says so in one line and exits 0 (--plan prints the plan as JSON either way; --dry-run prints
the commands without running them).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable

# (name, command, seconds): the budgets add up to 470 s, under the default total of 480 s.
PLAN = [
    ("install", [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], 160),
    ("gpu tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"], 120),
    ("ops: token_scores", [PY, "benchmarks/bench_token_scores.py", "--device", "cuda", "--quick"], 30),
    ("ops: prune_pack", [PY, "benchmarks/bench_prune_pack.py", "--device", "cuda", "--quick"], 30),
    ("ops: varlen_attention", [PY, "benchmarks/bench_varlen_attention.py", "--device", "cuda", "--quick"], 30),
    ("end to end", [PY, "benchmarks/throughput.py", "--device", "cuda", "--dtype", "bfloat16", "--batch", "256",
                    "--models", "tiny,small,base", "--modes", "topk", "--runs", "10", "--warmup", "3"], 60),
    ("train step", [PY, "benchmarks/bench_train_step.py", "--device", "cuda", "--amp", "bf16", "--models", "small",
                    "--batches", "64", "--steps", "5"], 40),
]

# The design targets (docs/design.md section 7) that these steps measure.
TARGETS = {
    "end to end vs dense (DeiT-S bf16 B256)": ">= 1.7x",
    "end to end vs reference (DeiT-S bf16 B256)": ">= 3x",
    "token_scores vs reference module": ">= 20x",
    "prune_pack, % of copy bandwidth": ">= 70%",
    "varlen_attention, % of copy bandwidth": ">= 60%",
    "varlen_attention vs best alternative": ">= 1.3x",
    "training step vs paper form (DeiT-S bf16 B64)": ">= 2x",
}


def plan(budget):
    """The steps with their time limits, scaled down when the total budget is smaller than the plan's sum."""
    total = sum(s for _, _, s in PLAN)
    scale = min(1.0, budget / total)
    return [{"step": name, "command": " ".join(Path(c).name if c == PY else c for c in cmd),
             "budget_s": round(seconds * scale)} for name, cmd, seconds in PLAN]


def _rows(path):
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def _meta(path):
    out = {}
    if path.exists():
        for line in open(path):
            if line.startswith("# ") and ": " in line:
                k, v = line[2:].rstrip("\n").split(": ", 1)
                out[k] = v
    return out


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def measured_figures(label):
    """Each targeted figure as measured in this run's CSVs (None where a step did not produce it)."""
    fig = dict.fromkeys(TARGETS)
    for r in _rows(RESULTS / f"throughput-{label}.csv"):
        if r.get("model") == "spvit_deit_small" and r.get("mode") == "topk" and r.get("provider") == "accelerated":
            fig["end to end vs dense (DeiT-S bf16 B256)"] = _num(r.get("speedup_vs_dense"))
            fig["end to end vs reference (DeiT-S bf16 B256)"] = _num(r.get("speedup_vs_reference"))
    ts = [_num(r.get("speedup_vs_module")) for r in _rows(RESULTS / f"token_scores-{label}.csv")
          if r.get("provider") == "triton"]
    fig["token_scores vs reference module"] = min((v for v in ts if v is not None), default=None)
    pp = [_num(r.get("pct_copy_ceiling")) for r in _rows(RESULTS / f"prune_pack-{label}.csv")
          if r.get("provider") == "cuda"]
    fig["prune_pack, % of copy bandwidth"] = min((v for v in pp if v is not None), default=None)
    va = [r for r in _rows(RESULTS / f"varlen_attention-{label}.csv") if r.get("provider") == "spvit_triton"]
    fig["varlen_attention, % of copy bandwidth"] = min((v for v in (_num(r.get("pct_copy_bw")) for r in va)
                                                        if v is not None), default=None)
    fig["varlen_attention vs best alternative"] = min(
        (v for v in (_num(r.get("speedup_vs_best_alternative")) for r in va) if v is not None), default=None)
    for r in _rows(RESULTS / f"train_step-{label}.csv"):
        if r.get("model") == "spvit_deit_small" and r.get("provider") == "fused":
            fig["training step vs paper form (DeiT-S bf16 B64)"] = _num(r.get("speedup_vs_paper"))
    return fig


def modeled_figures():
    """The modeled end-to-end speed-ups over dense (A100 / H100) from the roofline model's TOTAL rows."""
    totals = {}
    for r in _rows(RESULTS / "roofline-MODELED.csv"):
        if r.get("op") == "TOTAL" and r.get("model") == "DeiT-S":
            totals[(r["gpu"], r["variant"])] = _num(r.get("modeled_us"))
    out = {}
    for gpu in sorted({g for g, _ in totals}):
        dense, acc = totals.get((gpu, "dense")), totals.get((gpu, "accelerated"))
        if dense and acc:
            out[gpu] = dense / acc
    return out


def _meets(value, target):
    number = float(target.split()[1].rstrip("x%"))
    return value >= number


def write_summary(out_dir, label, steps, provenance):
    fig, modeled = measured_figures(label), modeled_figures()
    lines = [f"# GPU check: {provenance.get('device', label)}", "",
             "- " + "; ".join(f"{k} {v}" for k, v in provenance.items() if k != "device"), "",
             "| step | status | seconds (budget) |", "| --- | --- | ---: |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} ({s['budget_s']}) |" for s in steps]
    lines += ["", "| figure | measured | design target | met | modeled (not measured) |",
              "| --- | ---: | --- | --- | --- |"]
    for name, target in TARGETS.items():
        value = fig[name]
        shown = "not measured" if value is None else f"{value:.2f}" + ("%" if "%" in name else "x")
        met = "-" if value is None else ("yes" if _meets(value, target) else "**no**")
        model = ", ".join(f"{g}: {v:.2f}x" for g, v in modeled.items()) if name.startswith("end to end vs dense") \
            else "-"
        lines.append(f"| {name} | {shown} | {target} | {met} | {model} |")
    lines += ["", "Figures come from this run's CSVs under benchmarks/results/ (worst shape of each op); the "
              "modeled column from roofline-MODELED.csv (bytes, FLOPs and SASS instruction issue on datasheet "
              "peaks)."]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps together")
    p.add_argument("--plan", action="store_true", help="print the plan (steps, commands, budgets) as JSON")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    steps = plan(args.budget)
    if args.plan:
        print(json.dumps({"budget_s": args.budget, "steps": steps}, indent=2))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine, nothing to check (run it where a GPU is)")
        return 0
    if args.dry_run:
        for s in steps:
            print(f"{s['step']}: {s['command']} (<= {s['budget_s']} s)")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    label = common.device_label("cuda")
    out_dir = RESULTS / f"gpu_check-{label}"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = []
    for s, (_, cmd, _) in zip(steps, PLAN):
        left = args.budget - (time.perf_counter() - start)
        limit = max(1, min(s["budget_s"], left))
        t0 = time.perf_counter()
        log = out_dir / (s["step"].replace(": ", "_").replace(" ", "_") + ".log")
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        done.append({**s, "status": status, "seconds": time.perf_counter() - t0})
        print(f"gpu-check: {s['step']}: {status} ({done[-1]['seconds']:.0f} s)", flush=True)
        if s["step"] == "install" and status != "ok":
            break  # nothing else can run on a failed build
    provenance = common.provenance("cuda")
    write_summary(out_dir, label, done, provenance)
    (out_dir / "steps.json").write_text(json.dumps(done, indent=2))
    print(f"gpu-check: wrote {out_dir.relative_to(ROOT)}/summary.md")
    return 0 if all(d["status"] == "ok" for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
