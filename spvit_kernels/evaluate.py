"""Top-1 / top-5 and forward throughput of an SPViT checkpoint on an ImageFolder (single process or torchrun).

    python -m spvit_kernels.evaluate --data DIR --model spvit_deit_small --checkpoint ckpt.pth \\
        [--pruning topk|threshold] [--threshold T ...] [--calibration-images N] [--dtype float32|bfloat16|float16] \\
        [--batch-size N] [--workers N] [--threads N] [--num-classes N] [--img-size S] [--patch-size P] \\
        [--compare dense,reference] [--limit N] [--on-corrupt skip|error] [--out results.json]
    torchrun --nproc-per-node 8 -m spvit_kernels.evaluate --data DIR ...

The images go through the paper's transform (Resize 256 bicubic, CenterCrop 224, ImageNet mean / std; at
--img-size S: Resize S / 0.875, CenterCrop S). The
model is the accelerated SPViT (`spvit_kernels.accelerate`); --compare adds the dense backbone (the same
weights without selectors: model.vit) and the reference SPViT (the masked, un-accelerated form), each
with its top-1 agreement with the accelerated model. images/s counts the model forward only (synchronised
on the GPU); loading and copying the data is timed separately. Under torchrun every process evaluates its
own shard (no image twice), counts are summed and the forward time is the slowest process's.
"""

import argparse
import copy
import dataclasses
import json
import os
import sys

import torch

from ._cli import HelpFormatter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPARE = ("dense", "reference")


def parse_args(argv=None):
    from .models import list_models

    p = argparse.ArgumentParser(prog="python -m spvit_kernels.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root: one sub-folder of images per class")
    p.add_argument("--model", required=True, choices=list_models(), metavar="NAME",
                   help="one of: " + ", ".join(list_models()))
    p.add_argument("--checkpoint", help="our state_dict, the paper code's checkpoint or a backbone checkpoint "
                                        "(without it the weights are random, and a warning says so)")
    p.add_argument("--pruning", choices=("topk", "threshold"), default="topk",
                   help="top-k (fixed counts: the keep ratios) or threshold (per-image counts)")
    p.add_argument("--threshold", type=float, nargs="+",
                   help="threshold mode: one threshold, or one per stage (default: the checkpoint's, else "
                        "calibrated on --calibration-images)")
    p.add_argument("--calibration-images", type=int, default=256,
                   help="threshold mode without thresholds: calibrate on this many images drawn (seeded) across "
                        "the folder")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the model's and images' dtype")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward, per process")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per rank (default: fits the cores, at most 4)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: cores / processes)")
    p.add_argument("--compare", default="", help="comma-separated: dense, reference")
    p.add_argument("--limit", type=int,
                   help="evaluate the first N files of the folder only (ImageFolder order, corrupt ones included)")
    p.add_argument("--num-classes", type=int,
                   help="the model's classes (default: the checkpoint's head, else the folder's class count)")
    p.add_argument("--img-size", type=int, default=224, help="the model's image size (the training command's)")
    p.add_argument("--patch-size", type=int, help="the backbone's patch size (DeiT / LV-ViT; default 16)")
    p.add_argument("--on-corrupt", choices=("skip", "error"), default="skip",
                   help="an image that cannot be decoded: skip it (count and name it) or stop with an error")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    p.add_argument("--out", help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    compare = [c for c in args.compare.split(",") if c]
    bad = [c for c in compare if c not in COMPARE]
    if bad:
        p.error(f"--compare: unknown {bad}; choose among {list(COMPARE)}")
    args.compare = compare
    for name in ("batch_size", "limit", "num_classes", "img_size", "patch_size", "calibration_images", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.threshold is not None and args.pruning != "threshold":
        p.error("--threshold needs --pruning threshold")
    return args


def _build_model(args, device, dtype, calibration_images):
    """The accelerated model and, when asked, the reference one. Returns (models dict, config, threshold note)."""
    from . import accelerate
    from .models import CheckpointError, calibrate_thresholds, create_model, load_checkpoint

    sizes = {"img_size": args.img_size}
    if args.patch_size is not None:
        sizes["patch_size"] = args.patch_size
    cfg = {} if args.threshold is None else {"threshold": args.threshold[0] if len(args.threshold) == 1
                                             else tuple(args.threshold)}
    model = create_model(args.model, pruning=args.pruning, num_classes=args.num_classes, **sizes, **cfg)
    try:
        loaded = load_checkpoint(model, args.checkpoint_state) if args.checkpoint else None
    except CheckpointError as e:
        raise ValueError(f"--checkpoint {args.checkpoint}: {e}") from e
    if args.threshold is not None and loaded is not None and loaded.threshold is not None:  # the flag wins
        model.config = dataclasses.replace(model.config, threshold=create_model(
            args.model, pruning=args.pruning, num_classes=args.num_classes, **sizes, **cfg).config.threshold)
    model = model.to(device=device, dtype=dtype).eval()
    note = None
    if args.pruning == "threshold":
        if args.threshold is not None:
            note = f"from --threshold: {model.config.threshold}"
        elif loaded is not None and loaded.threshold is not None:
            note = f"from the checkpoint: {model.config.threshold}"
        elif calibration_images is None:
            raise ValueError("--data: no decodable image to calibrate the thresholds on")
        else:
            thresholds = calibrate_thresholds(model, calibration_images.to(device=device, dtype=dtype))
            note = (f"calibrated on {len(calibration_images)} images drawn across the folder (seed 0; the "
                    f"checkpoint has none, --threshold not given): {tuple(round(t, 4) for t in thresholds)}")
    # accelerate() changes the model's class in place: a shallow copy taken before keeps the reference
    # forward on the very same modules and config.
    reference = copy.copy(model)
    models = {"accelerated": (accelerate(model), True)}
    if "dense" in args.compare:
        if not isinstance(getattr(model, "vit", None), torch.nn.Module):
            raise ValueError(f"--compare dense: {args.model} has no dense backbone (model.vit)")
        models["dense"] = (model.vit, False)
    if "reference" in args.compare:
        models["reference"] = (reference, True)
    return models, model.config, note


def run(args):
    """Evaluate as `args` say; returns the result dict on rank 0 (None on the other ranks)."""
    from torch.utils.data import DataLoader, Subset

    from .evaluation import distributed
    from .evaluation.data import ShardSampler, calibration_sample, collate, open_image_folder
    from .evaluation.loop import evaluate_models

    rank, world, device = distributed.setup(args.device)
    try:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
        workers = args.workers
        if workers is None:  # more workers than cores only steal the model's threads
            workers = min(4, max(0, (os.cpu_count() or 1) // world - 1))
        dataset = open_image_folder(args.data, args.on_corrupt, args.img_size)
        folder = dataset
        classes = len(dataset.classes)
        args.checkpoint_state = None
        if args.checkpoint:
            from .models.checkpoint import CheckpointError, read_checkpoint

            try:
                args.checkpoint_state = read_checkpoint(args.checkpoint)
            except (CheckpointError, FileNotFoundError) as e:
                raise ValueError(f"--checkpoint: {str(e).replace(' (path_or_state_dict)', '')}") from e
        elif rank == 0:
            print(f"warning: no --checkpoint: {args.model} has random weights, so its accuracy means nothing",
                  file=sys.stderr)
        if args.num_classes is None:
            from .models.checkpoint import checkpoint_num_classes

            args.num_classes = (checkpoint_num_classes(args.checkpoint_state) if args.checkpoint_state else None) \
                or classes
        if classes > args.num_classes:
            raise ValueError(f"--data has {classes} classes, more than the model's --num-classes {args.num_classes}")
        if args.limit is not None:
            dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        dtype = DTYPES[args.dtype]
        calib = None
        if args.pruning == "threshold" and args.threshold is None:  # every rank draws the same sample
            calib = calibration_sample(dataset, args.calibration_images)[0]
        models, config, note = _build_model(args, device, dtype, calib)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=ShardSampler(len(dataset), rank, world),
                            num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")
        progress = None
        if rank == 0:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file gets no repeated bar lines)
            progress = lambda it: tqdm(it, desc=f"evaluate {args.model}", unit="batch", file=sys.stderr,  # noqa: E731
                                       disable=None)
        tallies, data_s, corrupt = evaluate_models(models, loader, device, dtype, config.num_stages, progress)
        corrupt_files = [folder.samples[i][0] for i in distributed.gather_indices(corrupt, len(folder), device)]
        (data_s_max,) = distributed.all_reduce([data_s], "max", device)
        result = {"model": args.model, "checkpoint": args.checkpoint, "pruning": args.pruning, "dtype": args.dtype,
                  "device": str(device.type), "processes": world, "threads": torch.get_num_threads(),
                  "workers": workers, "batch_size": args.batch_size, "num_classes": args.num_classes,
                  "corrupt_skipped": len(corrupt_files), "corrupt_files": corrupt_files,
                  "data_loading_s": data_s_max, "threshold_note": note,
                  "keep_ratios": list(config.keep_ratios), "selector_layers": list(config.selector_layers)}
        for name, tally in tallies.items():
            summary, agree = tally.reduced(device)
            if name != "accelerated":
                summary["top1_agreement"] = 100.0 * agree / max(summary["images"], 1)
            result[name] = summary
        result["images"] = result["accelerated"]["images"]
        if result["images"] == 0:
            raise ValueError(f"--data: no image of {args.data!r} could be decoded ({len(corrupt_files)} corrupt)")
        return result if rank == 0 else None
    finally:
        distributed.teardown()


def format_result(r):
    """The human-readable summary rank 0 prints."""
    lines = [f"{r['model']} ({r['pruning']}, {r['dtype']}, {r['device']}, {r['processes']} process(es), "
             f"batch {r['batch_size']}): {r['images']} images, {r['corrupt_skipped']} corrupt skipped"]
    if r["corrupt_files"]:
        names = r["corrupt_files"]
        lines.append("skipped (cannot be decoded): " + ", ".join(names[:10])
                     + (f" and {len(names) - 10} more" if len(names) > 10 else ""))
    if r["threshold_note"]:
        lines.append(f"thresholds {r['threshold_note']}")
    lines.append(f"{'model':<12} {'top-1 %':>8} {'top-5 %':>8} {'images/s':>10}  {'agree %':>8}  tokens per stage")
    for name in ("accelerated", "dense", "reference"):
        if name not in r:
            continue
        m = r[name]
        ips = f"{m['images_per_s']:.1f}" if m["images_per_s"] else "n/a"
        agree = f"{m['top1_agreement']:.2f}" if "top1_agreement" in m else "-"
        tokens = ", ".join(f"{t:.1f}" for t in m.get("mean_tokens_per_stage", [])) or "all (dense)"
        lines.append(f"{name:<12} {m['top1']:>8.2f} {m['top5']:>8.2f} {ips:>10}  {agree:>8}  {tokens}")
    lines.append(f"images/s: model forward only; data loading and copying took {r['data_loading_s']:.2f} s "
                 "(slowest process), not counted")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line is the error
            message = message.splitlines()[-1].split(": ", 1)[-1]  # "module.ErrorType: message"
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: say it once
            print(f"error: {message}", file=sys.stderr)
        return 2
    if result is not None:
        print(format_result(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
