"""Process-group handling for torchrun: one process per device, gloo on CPU, NCCL on GPU."""

import os

import torch
import torch.distributed as dist


def setup(device_arg):
    """Join the torchrun process group when WORLD_SIZE > 1. Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError as e:
        raise ValueError(f"--device: {device_arg!r} is not a device ({str(e).splitlines()[0]})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_arg}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device_arg!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce(values, op, device):
    """Sum / mean / max a list of floats over the ranks (no-op in a single process). float64 keeps counts exact."""
    if op not in ("sum", "mean", "max"):
        raise ValueError(f"op must be 'sum', 'mean' or 'max', got {op!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return t.tolist()


def gather_indices(indices, n, device):
    """The sorted union over the ranks of integer indices in range(n) (a single process: its own), by one
    all_reduce of an (n,) mask: the same collective the counts use (gloo's object gathers aborted at teardown)."""
    if not (dist.is_available() and dist.is_initialized()):
        return sorted(indices)
    mask = torch.zeros(n, dtype=torch.float64, device=device)
    if indices:
        mask[torch.tensor(list(indices), dtype=torch.int64, device=device)] = 1
    dist.all_reduce(mask, op=dist.ReduceOp.SUM)
    return mask.nonzero().flatten().tolist()


def teardown():
    if dist.is_available() and dist.is_initialized():
        # A rank that tears down while a peer still drains the last collective closes the gloo connection
        # under it (the peer then aborts): meet once more first, then leave together.
        dist.barrier()
        dist.destroy_process_group()
