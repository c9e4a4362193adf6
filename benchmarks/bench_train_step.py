"""The SPViT training step: the library's training forms against the paper code's form, side by side.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--models tiny,small] [--batches 8,32] [--steps 3]
                                          [--amp none|bf16]

Step: the training forward (model.train(), Gumbel noise drawn from a fixed seed), SPViTLoss with the dense backbone as
teacher (its forward under no_grad is part of the step), backward; no optimiser step (the same for both providers).
Providers (benchmarks/paper_form.py): "paper_form" (eye-matrix policy attention in plain autograd, a Python loop
over the heads in the selector, PyTorch-eager blocks, the teacher's attention with its scores materialised, as the
official code) and, on the CPU, "ours" (the one-buffer
policy-attention autograd function, all heads in one batched selector); on a GPU "reference" (those PyTorch forms,
the fused kernels switched off with spvit_kernels.training.fused_kernels(False)) and "fused" (the training forward
as it runs on a GPU: policy_attention, selector_train, add_layer_norm and gelu_mlp kernels). All run the same
modules and weights; their logits, decisions and gradients are checked to agree, in float32, before anything is
timed (on a GPU then under --amp, default bf16 autocast).

Reported per (model, batch, provider): images/s (batch / median step time of --steps timed steps after one
warm-up step), the bytes autograd saves for backward in one step (unique storages, counted with
saved_tensors_hooks: a deterministic memory figure) and the peak memory of a fresh process running the step above
its memory just before the first step: resident memory on the CPU (CPU tensors have no allocator statistics),
torch.cuda.max_memory_allocated on a GPU. Writes benchmarks/results/train_step-<device>.csv.
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
from spvit_kernels.training import SPViTLoss, fused_kernels  # noqa: E402

MODELS = {"tiny": "spvit_deit_tiny", "small": "spvit_deit_small"}
PROVIDERS = {"cpu": ("paper_form", "ours"), "cuda": ("paper_form", "reference", "fused")}
# Largest relative difference between providers in float32 (GPU: other reduction orders, the Triton kernels').
AGREE = {"cpu": 1e-4, "cuda": 2e-3}


def build(name, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    teacher = copy.deepcopy(model.vit)
    return model.train().to(device), SPViTLoss(teacher.to(device), model.config.keep_ratios)


def provider_context(provider):
    """The paper code's forms (with the fused kernels off), the library's PyTorch forms, or the default."""
    stack = contextlib.ExitStack()
    if provider == "paper_form":
        stack.enter_context(paper_form())
    if provider in ("paper_form", "reference"):
        stack.enter_context(fused_kernels(False))
    return stack


def _amp(device, amp):
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def step(model, loss_fn, images, targets, provider, seed=1, amp="none"):
    torch.manual_seed(seed)  # the same Gumbel noise for every provider
    with provider_context(provider):
        with _amp(images.device, amp):
            out = model(images)
            loss = loss_fn(images, out, targets)
        loss.backward()
    return out, loss


def _inputs(model, batch, img_size, device):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    targets = torch.randint(0, model.vit.num_classes, (batch,), generator=g)
    return images.to(device), targets.to(device)


def check_agreement(name, batch, img_size=224, device="cpu", **kw):
    """Every provider of the device: same loss, logits, decisions and gradients as the first (float32
    tolerances). Raises otherwise."""
    device = torch.device(device)
    results = {}
    for provider in PROVIDERS[device.type]:
        model, loss_fn = build(name, device=device, img_size=img_size, **kw)
        images, targets = _inputs(model, batch, img_size, device)
        out, loss = step(model, loss_fn, images, targets, provider)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[provider] = (out.logits.detach(), torch.stack([d.detach() for d in out.decisions]), grads,
                             loss.detach())
    first, *others = PROVIDERS[device.type]
    for provider in others:
        for what, x, y in zip(("logits", "decisions", "gradients", "loss"), results[first], results[provider]):
            scale = y.abs().max().clamp(min=1e-6)
            err = ((x - y).abs().max() / scale).item()
            if err > AGREE[device.type]:
                raise AssertionError(f"{provider} and {first} disagree on {what}: relative error {err:.3g}")
    return True


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def saved_bytes(model, loss_fn, images, targets, provider, amp="none"):
    """Bytes of the unique storages autograd saves for backward in one step (the forward and loss)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().data_ptr() != 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with provider_context(provider), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            _amp(images.device, amp):
        out = model(images)
        loss = loss_fn(images, out, targets)
    del out, loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(name, batch, provider, steps, device="cpu", amp="none"):
    device = torch.device(device)
    model, loss_fn = build(name, device=device)
    images, targets = _inputs(model, batch, 224, device)
    saved = saved_bytes(model, loss_fn, images, targets, provider, amp)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device) / 2**20
    else:
        mem0 = _rss_mb()
    times = []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        step(model, loss_fn, images, targets, provider, amp=amp)
        _sync(device)
        if i > 0:  # the first step warms up (and, on a GPU, compiles the Triton kernels)
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ms = statistics.median(times) * 1e3
    return dict(step_ms=round(ms, 1), images_per_s=round(batch / ms * 1e3, 2), saved_mb=round(saved / 2**20, 1),
                peak_rss_mb=round(peak - mem0, 1), rss_before_mb=round(mem0, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small", help="short names: " + ", ".join(MODELS))
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per provider (after one warm-up)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"),
                        help="autocast for the timed steps on a GPU (default bf16; the CPU runs float32)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "BATCH", "PROVIDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible")
    amp = args.amp or ("bf16" if args.device == "cuda" else "none")
    if args.worker:
        name, batch, provider = args.worker
        print(json.dumps(worker(name, int(batch), provider, args.steps, args.device, amp)))
        return None
    models = [MODELS.get(m, m) for m in args.models.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    providers = PROVIDERS[args.device]
    for name in models:
        check_agreement(name, 2, device=args.device)
        print(f"{name}: providers agree (logits, decisions, gradients, loss)")
    rows = []
    for name in models:
        for batch in batches:
            by = {}
            for provider in providers:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--steps", str(args.steps),
                                       "--device", args.device, "--amp", amp, "--worker", name, str(batch),
                                       provider], capture_output=True, text=True, check=True)
                by[provider] = json.loads(proc.stdout.strip().splitlines()[-1])
            for provider in providers:
                r = dict(model=name, batch=batch, provider=provider, **by[provider])
                r["speedup_vs_paper"] = round(by["paper_form"]["step_ms"] / r["step_ms"], 3)
                r["saved_vs_paper"] = round(r["saved_mb"] / by["paper_form"]["saved_mb"], 3)
                r["peak_rss_vs_paper"] = round(r["peak_rss_mb"] / by["paper_form"]["peak_rss_mb"], 3)
                rows.append(r)
                print(f"{name:18s} B={batch:3d} {provider:10s} {r['images_per_s']:7.2f} img/s "
                      f"{r['step_ms']:9.1f} ms  saved {r['saved_mb']:8.1f} MB  peak RSS +{r['peak_rss_mb']:8.1f} MB"
                      f"  x{r['speedup_vs_paper']:.2f}")
    precision = "float32" if amp == "none" else f"{amp} autocast"
    common.write_csv("train_step", args.device, rows, {
        "step": f"train forward + SPViTLoss (dense teacher) + backward, {precision}, 224 px, 1000 classes; "
                "no optimiser step",
        "steps": f"median of {args.steps} after 1 warm-up",
        "peak_rss_mb": "peak resident memory above the process's before the first step" if args.device == "cpu"
        else "torch.cuda.max_memory_allocated above the allocated memory before the first step"})
    return rows


if __name__ == "__main__":
    main()
