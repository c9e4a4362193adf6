"""The SPViT training step on the CPU: the library's training form against the paper code's form, side by side.

    python benchmarks/bench_train_step.py [--models tiny,small] [--batches 8,32] [--steps 3]

Step: the training forward (model.train(), Gumbel noise drawn from a fixed seed), SPViTLoss with the dense backbone as
teacher (its forward under no_grad is part of the step), backward; no optimiser step (the same for both providers).
Providers (benchmarks/paper_form.py): "paper_form" (eye-matrix policy attention in plain autograd, a Python loop
over the heads in the selector, as the official code) and "ours" (the one-buffer policy-attention autograd
function, all heads in one batched selector). Both run the same modules and weights; their logits, decisions and
gradients are checked to agree before anything is timed.

Reported per (model, batch, provider): images/s (batch / median step time of --steps timed steps after one
warm-up step), the bytes autograd saves for backward in one step (unique storages, counted with
saved_tensors_hooks: a deterministic memory figure) and the peak resident memory of a fresh process running the
step, above its resident memory just before the first step (CPU tensors have no allocator statistics).
Writes benchmarks/results/train_step-<device>.csv.
"""

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from paper_form import paper_form  # noqa: E402

from spvit_kernels.models import create_model  # noqa: E402
from spvit_kernels.training import SPViTLoss  # noqa: E402

MODELS = {"tiny": "spvit_deit_tiny", "small": "spvit_deit_small"}
PROVIDERS = ("paper_form", "ours")


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    teacher = copy.deepcopy(model.vit)
    return model.train(), SPViTLoss(teacher, model.config.keep_ratios)


def step(model, loss_fn, images, targets, provider, seed=1):
    torch.manual_seed(seed)  # the same Gumbel noise for both providers
    ctx = paper_form() if provider == "paper_form" else contextlib.nullcontext()
    with ctx:
        out = model(images)
        loss = loss_fn(images, out, targets)
        loss.backward()
    return out, loss


def check_agreement(name, batch, img_size=224, **kw):
    """Both providers: same loss, logits, decisions and gradients (float32 tolerances). Raises otherwise."""
    results = {}
    for provider in PROVIDERS:
        model, loss_fn = build(name, img_size=img_size, **kw)
        g = torch.Generator().manual_seed(2)
        images = torch.randn(batch, 3, img_size, img_size, generator=g)
        targets = torch.randint(0, model.vit.num_classes, (batch,), generator=g)
        out, loss = step(model, loss_fn, images, targets, provider)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[provider] = (out.logits.detach(), torch.stack([d.detach() for d in out.decisions]), grads,
                             loss.detach())
    a, b = results["paper_form"], results["ours"]
    for what, x, y in zip(("logits", "decisions", "gradients", "loss"), a, b):
        scale = y.abs().max().clamp(min=1e-6)
        err = ((x - y).abs().max() / scale).item()
        if err > 1e-4:
            raise AssertionError(f"providers disagree on {what}: relative error {err:.3g}")
    return True


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def saved_bytes(model, loss_fn, images, targets, provider):
    """Bytes of the unique storages autograd saves for backward in one step (the forward and loss)."""
    seen = {}

    def pack(t):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() != 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    ctx = paper_form() if provider == "paper_form" else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images)
        loss = loss_fn(images, out, targets)
    del out, loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def worker(name, batch, provider, steps):
    model, loss_fn = build(name)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, 224, 224, generator=g)
    targets = torch.randint(0, model.vit.num_classes, (batch,), generator=g)
    saved = saved_bytes(model, loss_fn, images, targets, provider)
    model.zero_grad(set_to_none=True)
    rss0 = _rss_mb()
    times = []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step(model, loss_fn, images, targets, provider)
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ms = statistics.median(times) * 1e3
    return dict(step_ms=round(ms, 1), images_per_s=round(batch / ms * 1e3, 2), saved_mb=round(saved / 2**20, 1),
                peak_rss_mb=round(peak - rss0, 1), rss_before_mb=round(rss0, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small", help="short names: " + ", ".join(MODELS))
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per provider (after one warm-up)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "BATCH", "PROVIDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        name, batch, provider = args.worker
        print(json.dumps(worker(name, int(batch), provider, args.steps)))
        return None
    models = [MODELS.get(m, m) for m in args.models.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for name in models:
        check_agreement(name, 2)
        print(f"{name}: providers agree (logits, decisions, gradients, loss)")
    rows = []
    for name in models:
        for batch in batches:
            by = {}
            for provider in PROVIDERS:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--steps", str(args.steps),
                                       "--worker", name, str(batch), provider], capture_output=True, text=True,
                                      check=True)
                by[provider] = json.loads(proc.stdout.strip().splitlines()[-1])
            for provider in PROVIDERS:
                r = dict(model=name, batch=batch, provider=provider, **by[provider])
                r["speedup_vs_paper"] = round(by["paper_form"]["step_ms"] / r["step_ms"], 3)
                r["saved_vs_paper"] = round(r["saved_mb"] / by["paper_form"]["saved_mb"], 3)
                r["peak_rss_vs_paper"] = round(r["peak_rss_mb"] / by["paper_form"]["peak_rss_mb"], 3)
                rows.append(r)
                print(f"{name:18s} B={batch:3d} {provider:10s} {r['images_per_s']:7.2f} img/s "
                      f"{r['step_ms']:9.1f} ms  saved {r['saved_mb']:8.1f} MB  peak RSS +{r['peak_rss_mb']:8.1f} MB"
                      f"  x{r['speedup_vs_paper']:.2f}")
    common.write_csv("train_step", "cpu", rows, {"step": "train forward + SPViTLoss (dense teacher) + backward, "
                                                 "float32, 224 px, 1000 classes; no optimiser step",
                                                 "steps": f"median of {args.steps} after 1 warm-up"})
    return rows


if __name__ == "__main__":
    main()
