"""One training epoch and the validation passes of `python -m spvit_kernels.train`."""

import contextlib
import sys
import time

import torch

from ..evaluation import distributed

LOSS_TERMS = ("clf", "ratio", "cls_kl", "token", "total")


def _progress(iterable, enabled, desc, total):
    """A tqdm bar on an interactive terminal of rank 0; None elsewhere (one line per epoch is printed instead)."""
    if not enabled or not sys.stderr.isatty():
        return iterable, None
    from tqdm import tqdm

    bar = tqdm(iterable, desc=desc, total=total, unit="batch", file=sys.stderr, dynamic_ncols=True)
    return bar, bar


def train_one_epoch(model, loss_fn, loader, optimizer, *, device, epoch, accum=1, scaler=None, amp_dtype=None,
                    mixup=None, ema=None, clip_grad=None, show=True):
    """Train `model` (possibly DistributedDataParallel-wrapped) for one epoch. Returns the epoch's means over
    the ranks: each loss term, the kept ratio of every stage, and the number of images."""
    model.train()
    sums = {k: 0.0 for k in LOSS_TERMS}
    kept_sums, images_seen, steps = None, 0, 0
    it, bar = _progress(loader, show, f"epoch {epoch}", len(loader))
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(it):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        last_micro = (i + 1) % accum == 0 or i + 1 == len(loader)
        # Gradients are averaged over the ranks once per optimiser step: no all-reduce on the other micro-batches.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with sync:
            with autocast:
                out = model(images)
                loss = loss_fn(images, out, targets)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        ratios = [float(d.detach().float().mean()) for d in out.decisions]
        if last_micro:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model.module if hasattr(model, "module") else model)
        if getattr(loss_fn, "ratio_multiplier_lr", 0.0):
            # Every micro-batch's ratios move the multipliers (mean over the ranks: the same multipliers everywhere).
            loss_fn.update_multipliers(distributed.all_reduce(ratios, "mean", device))
        kept_sums = ratios if kept_sums is None else [a + b for a, b in zip(kept_sums, ratios)]
        for k in LOSS_TERMS:
            sums[k] += loss_fn.last.get(k, 0.0)
        steps += 1
        images_seen += images.shape[0]
        if bar is not None:
            bar.set_postfix(loss=f"{loss_fn.last['total']:.4f}", kept="/".join(f"{r:.2f}" for r in ratios))
    if bar is not None:
        bar.close()
    kept_sums = kept_sums or []
    totals = distributed.all_reduce([steps, images_seen, *sums.values(), *kept_sums], "sum", device)
    n = max(totals[0], 1)
    means = {k: v / n for k, v in zip(LOSS_TERMS, totals[2: 2 + len(LOSS_TERMS)])}
    means["kept"] = [v / n for v in totals[2 + len(LOSS_TERMS):]]
    means["images"] = int(totals[1])
    return means


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, return_kept=False):
    """Top-1 / top-5 counts of `model` (eval mode) over `loader`, reduced over the ranks. With return_kept, also
    the predictions (class indices, in loader order, this rank's) and the mean tokens per stage."""
    model.eval()
    correct1 = correct5 = total = 0
    preds, tokens = [], None
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            if return_kept:
                logits, info = model(images, return_info=True)
                t = info["num_tokens"].double().sum(dim=1).tolist()
                tokens = t if tokens is None else [a + b for a, b in zip(tokens, t)]
            else:
                logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top5[:, 0] == targets).sum())
        correct5 += int((top5 == targets[:, None]).any(dim=1).sum())
        total += images.shape[0]
        preds.append(top5[:, 0].cpu())
    c1, c5, n = distributed.all_reduce([correct1, correct5, total], "sum", device)
    result = {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "images": int(n)}
    if return_kept:
        tokens = distributed.all_reduce(tokens or [], "sum", device)
        result["mean_tokens_per_stage"] = [t / max(n, 1) for t in tokens]
        return result, torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return result


@torch.no_grad()
def images_per_second(model, images, repeats=5):
    """Median images/s of model(images) over `repeats` timed calls after one warm-up (synchronised on a GPU)."""
    model.eval()
    times = []
    for i in range(repeats + 1):
        if images.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    times.sort()
    return images.shape[0] / times[len(times) // 2]
