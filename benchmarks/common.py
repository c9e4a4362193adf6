"""Shared benchmark plumbing: timing, ceilings, provenance, CSV and plots.

Every benchmark in this folder
  * checks that its providers agree before timing them (`assert_close_providers`),
  * times with `time_ms` (triton.testing.do_bench on a GPU, a median of repeated runs on a CPU),
  * reports achieved GB/s or TFLOP/s against ceilings measured in the same run (`measure_ceilings`),
  * writes `benchmarks/results/<name>-<device>.csv` (+ a PNG where matplotlib is installed) whose first
    lines (`# key: value`) record the device, versions, commit and date (`provenance`).
"""

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_label(device):
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).replace(" ", "-")
    return "cpu-" + (platform.processor() or platform.machine() or "unknown").replace(" ", "-")


ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        # The results a run (re)writes do not make the code it ran dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device):
    """Where and with what a result was measured."""
    info = {
        "device": device_label(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "cpu_threads": str(torch.get_num_threads()),
        # CPU timings of large outputs depend on the allocator: glibc hands out allocations above its mmap
        # threshold (at most 32 MiB by default) as fresh pages that fault in on every call.
        "allocator_env": "; ".join(f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV if k in os.environ) or "default",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "none"
    return info


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, warmup=3, rep=None, min_time_s=0.2):
    """Median milliseconds of fn().

    GPU: triton.testing.do_bench (L2 flushed between runs, quantile 0.5). CPU: fn runs until `min_time_s`
    has passed (and at least 5 times) after `warmup` calls; the median single-run time is returned.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep or 100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if rep is not None and len(times) >= rep:
            break
    return statistics.median(times)


def measure_ceilings(device, *, copy_mib=1024, matmul_n=8192):
    """Measured ceilings of this device: copy bandwidth (GB/s, bytes read + written) and bf16 matmul TFLOP/s.

    On a CPU the sizes are scaled down and the matmul is float32.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        copy_mib, matmul_n = min(copy_mib, 256), min(matmul_n, 1024)
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), dev)
    copy_gbs = 2 * src.numel() * 4 / ms / 1e6
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=dev, dtype=dtype)
    ms = time_ms(lambda: a @ b, dev)
    matmul_tflops = 2 * matmul_n**3 / ms / 1e9
    del src, dst, a, b
    return {"copy_GBps": round(copy_gbs, 1), f"matmul_{str(dtype).replace('torch.', '')}_TFLOPs": round(matmul_tflops, 2)}


def assert_close_providers(results, reference_name, *, atol, rtol, what="output"):
    """Check every provider's output against `reference_name`'s before anything is timed.

    `results` maps provider name -> tensor or tuple of tensors.
    """
    ref = results[reference_name]
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for name, out in results.items():
        out = out if isinstance(out, (tuple, list)) else (out,)
        for i, (a, b) in enumerate(zip(out, ref)):
            if a.dtype.is_floating_point:
                torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, equal_nan=True,
                                           msg=lambda m: f"{name} disagrees with {reference_name} ({what} {i}): {m}")
            else:
                assert torch.equal(a.cpu(), b.cpu()), f"{name} disagrees with {reference_name} ({what} {i})"


def spread_selector(sel, gen):
    """Re-draw a TokenSelector's weights (in place) with the spread of trained ones, so that its keep scores vary
    by O(1) instead of ~1e-5 at the official init: Linear weights ~ N(0, (1.5 / sqrt(fan_in))^2), every 1-D
    parameter ~ N(0, 0.2^2), then 1 added to the LayerNorm weight. Draws from the CPU generator `gen`."""
    with torch.no_grad():
        for p in sel.parameters():
            scale = 1.5 / p.shape[1] ** 0.5 if p.dim() == 2 else 0.2
            p.copy_((scale * torch.randn(p.shape, generator=gen)).to(p.device))
        sel.norm.weight.add_(1.0)


def write_csv(name, device, rows, extra_meta=None, *, label=None, results_dir=None):
    """Write rows (list of dicts) to results/<name>-<device>.csv with `# key: value` provenance lines
    (label, if given, replaces the device in the file name and the `device` line: e.g. for offline
    compiles or models, which no device ran; results_dir replaces benchmarks/results)."""
    results_dir = results_dir or RESULTS_DIR
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}-{label or device_label(device)}.csv")
    meta = provenance(device)
    if label:
        meta["device"] = label
    meta.update(extra_meta or {})
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path


def plot_bars(name, device, rows, *, x, y, group, ylabel, title):
    """A grouped bar chart of rows[y] per rows[x], one bar per rows[group]; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    xs = list(dict.fromkeys(r[x] for r in rows))
    groups = list(dict.fromkeys(r[group] for r in rows))
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(xs) + 2), 4))
    for i, g in enumerate(groups):
        vals = [next((r[y] for r in rows if r[x] == xv and r[group] == g), 0) for xv in xs]
        ax.bar([j + i * width for j in range(len(xs))], vals, width, label=str(g))
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(xs))])
    ax.set_xticklabels([str(v) for v in xs], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{device_label(device)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(RESULTS_DIR, f"{name}-{device_label(device)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path
