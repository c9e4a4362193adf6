"""Training checkpoints that resume exactly: model, optimizer, scaler, EMA, epoch, every random generator, args."""

import os
import random

import numpy as np
import torch


def seed_all(seed):
    """Seed every generator a training step draws from."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state():
    """The generators a training step draws from (torch's CPU and CUDA ones, numpy's, Python's), as tensors and
    plain values only, so that the checkpoint also loads with torch.load(weights_only=True) (load_checkpoint)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path, *, model, optimizer, scaler, ema, epoch, args, best_top1, rng, ratio_multipliers=None):
    """Write the checkpoint (atomically: a crash mid-write leaves the previous one). `model` is the bare module
    (not the DistributedDataParallel wrapper); `rng` the per-rank generator states (a list, rank order);
    `ratio_multipliers` the loss's Lagrange multipliers (S,) (None: the paper's loss, none kept)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "model_ema": ema.module.state_dict() if ema is not None else None,
             "epoch": epoch, "best_top1": best_top1, "rng": rng, "args": vars(args),
             "ratio_multipliers": None if ratio_multipliers is None else ratio_multipliers.detach().cpu().clone()}
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path):
    """The checkpoint dict (trusted: written by this command)."""
    return torch.load(path, map_location="cpu", weights_only=False)
