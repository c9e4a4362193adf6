"""The measured evaluation loop: accuracy counts, forward-only timing, tokens per stage, top-1 agreement."""

import time

import torch

from .distributed import all_reduce


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Tally:
    """Running sums of one model over the images this process saw."""

    def __init__(self, num_stages=0):
        self.images = self.top1 = self.top5 = self.agree = 0
        self.forward_s = 0.0
        self.tokens = [0] * num_stages

    def add(self, logits, labels, reference_top1, info=None):
        k = min(5, logits.shape[-1])
        top = logits.float().topk(k, dim=-1).indices.cpu()
        self.images += len(labels)
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels[:, None]).any(dim=-1).sum())
        if reference_top1 is not None:
            self.agree += int((top[:, 0] == reference_top1).sum())
        if info is not None:
            self.tokens = [t + int(n) for t, n in zip(self.tokens, info["num_tokens"].sum(dim=1))]
        return top[:, 0]

    def reduced(self, device):
        """The totals over all ranks: counts summed; forward time the slowest rank's (ranks run in parallel)."""
        counts = all_reduce([self.images, self.top1, self.top5, self.agree, *self.tokens], "sum", device)
        (forward_s,) = all_reduce([self.forward_s], "max", device)
        images, top1, top5, agree, *tokens = (int(c) for c in counts)
        n = max(images, 1)
        out = {"images": images, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "forward_s": forward_s,
               "images_per_s": images / forward_s if forward_s > 0 else None}
        if self.tokens:
            out["mean_tokens_per_stage"] = [t / n for t in tokens]
        return out, agree


def _forward(model, images, device, with_info):
    _sync(device)
    start = time.perf_counter()
    out = model(images, return_info=with_info) if with_info else model(images)
    _sync(device)
    return out, time.perf_counter() - start


@torch.no_grad()
def evaluate_models(models, loader, device, dtype, num_stages, progress=None):
    """Run every model on every batch of `loader`; the first of `models` is the one the others agree with.

    Args:
        models: dict name -> (module, with_info): with_info=True calls module(images, return_info=True).
        loader: yields (images (B, 3, H, W) float32 or None, labels (B,), indices (B,), corrupt indices).
        device, dtype: where and in which dtype the images go.
        num_stages: pruning stages (length of the tokens-per-stage sums).
        progress: an optional tqdm-like wrapper of the loader.
    Returns:
        (tallies: dict name -> Tally, data_s: seconds spent waiting for batches and copying them, dataset indices
        of the images that could not be decoded).
    Each model runs once untimed on the first batch first (one-time costs: kernel compilation, allocations).
    """
    tallies = {name: Tally(num_stages if with_info else 0) for name, (_, with_info) in models.items()}
    main = next(iter(models))
    data_s, corrupt, warm = 0.0, [], False
    batches = iter(progress(loader) if progress else loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        images, labels, _, bad = batch
        corrupt.extend(bad)
        if images is None:
            data_s += time.perf_counter() - start
            continue
        images = images.to(device=device, dtype=dtype, non_blocking=True)
        _sync(device)
        data_s += time.perf_counter() - start
        if not warm:
            for module, with_info in models.values():
                _forward(module, images, device, with_info)
            warm = True
        main_top1 = None
        for name, (module, with_info) in models.items():
            out, seconds = _forward(module, images, device, with_info)
            logits, info = out if with_info else (out, None)
            tallies[name].forward_s += seconds
            top1 = tallies[name].add(logits, labels, None if name == main else main_top1, info)
            if name == main:
                main_top1 = top1
    return tallies, data_s, corrupt
