"""Top-1 / top-5 and forward throughput of an SPViT checkpoint on an ImageFolder (single process or torchrun).

    python -m spvit_kernels.evaluate --data DIR --model spvit_deit_small --checkpoint ckpt.pth \\
        [--pruning topk|threshold] [--dtype float32|bfloat16|float16] [--batch-size N] [--workers N] \\
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
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPARE = ("dense", "reference")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m spvit_kernels.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder root: one sub-folder of images per class")
    p.add_argument("--model", required=True, help="a name of spvit_kernels.models.list_models()")
    p.add_argument("--checkpoint", help="our state_dict, the paper code's checkpoint or a backbone checkpoint")
    p.add_argument("--pruning", choices=("topk", "threshold"), default="topk")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    p.add_argument("--compare", default="", help="comma-separated: dense, reference")
    p.add_argument("--limit", type=int,
                   help="evaluate the first N files of the folder only (ImageFolder order, corrupt ones included)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--img-size", type=int, default=224, help="the model's image size (the training command's)")
    p.add_argument("--patch-size", type=int, help="the backbone's patch size (DeiT / LV-ViT; default 16)")
    p.add_argument("--on-corrupt", choices=("skip", "error"), default="skip",
                   help="an image that cannot be decoded: skip it (and count it) or stop with an error")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    p.add_argument("--out", help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    compare = [c for c in args.compare.split(",") if c]
    bad = [c for c in compare if c not in COMPARE]
    if bad:
        p.error(f"--compare: unknown {bad}; choose among {list(COMPARE)}")
    args.compare = compare
    for name in ("batch_size", "limit", "num_classes", "img_size", "patch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    return args


def _build_model(args, device, dtype, calibration_images):
    """The accelerated model and, when asked, the reference one. Returns (models dict, threshold note)."""
    from . import accelerate
    from .models import CheckpointError, calibrate_thresholds, create_model, list_models, load_checkpoint

    if args.model not in list_models():
        raise ValueError(f"--model must be one of {list_models()}, got {args.model!r}")
    sizes = {"img_size": args.img_size}
    if args.patch_size is not None:
        sizes["patch_size"] = args.patch_size
    model = create_model(args.model, pruning=args.pruning, num_classes=args.num_classes, **sizes)
    try:
        loaded = load_checkpoint(model, args.checkpoint) if args.checkpoint else None
    except CheckpointError as e:
        hint = " (is --num-classes the checkpoint's?)" if "head." in str(e) else ""
        raise ValueError(f"--checkpoint {args.checkpoint}{hint}: {e}") from e
    model = model.to(device=device, dtype=dtype).eval()
    note = None
    if args.pruning == "threshold":
        if loaded is not None and loaded.threshold is not None:
            note = f"from the checkpoint: {model.config.threshold}"
        elif calibration_images is None:
            raise ValueError("--data: no decodable image to calibrate the thresholds on")
        else:
            thresholds = calibrate_thresholds(model, calibration_images.to(device=device, dtype=dtype))
            note = (f"calibrated on the first {len(calibration_images)} images (the checkpoint has none): "
                    f"{tuple(round(t, 4) for t in thresholds)}")
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
    from .evaluation.data import ShardSampler, collate, open_image_folder
    from .evaluation.loop import evaluate_models

    rank, world, device = distributed.setup(args.device)
    try:
        dataset = open_image_folder(args.data, args.on_corrupt, args.img_size)
        classes = len(dataset.classes)
        if classes > args.num_classes:
            raise ValueError(f"--data has {classes} classes, more than the model's --num-classes {args.num_classes}")
        if args.limit is not None:
            dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        dtype = DTYPES[args.dtype]
        calib = None
        if args.pruning == "threshold":  # every rank calibrates on the same images: the first batch
            calib = collate([dataset[i] for i in range(min(args.batch_size, len(dataset)))])[0]
        models, config, note = _build_model(args, device, dtype, calib)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=ShardSampler(len(dataset), rank, world),
                            num_workers=args.workers, collate_fn=collate, pin_memory=device.type == "cuda")
        progress = None
        if rank == 0:
            from tqdm import tqdm

            progress = lambda it: tqdm(it, desc=f"evaluate {args.model}", unit="batch", file=sys.stderr)  # noqa: E731
        tallies, data_s, corrupt = evaluate_models(models, loader, device, dtype, config.num_stages, progress)
        (corrupt,) = (int(c) for c in distributed.all_reduce([corrupt], "sum", device))
        (data_s_max,) = distributed.all_reduce([data_s], "max", device)
        result = {"model": args.model, "checkpoint": args.checkpoint, "pruning": args.pruning, "dtype": args.dtype,
                  "device": str(device.type), "processes": world, "batch_size": args.batch_size,
                  "corrupt_skipped": corrupt, "data_loading_s": data_s_max, "threshold_note": note,
                  "keep_ratios": list(config.keep_ratios), "selector_layers": list(config.selector_layers)}
        for name, tally in tallies.items():
            summary, agree = tally.reduced(device)
            if name != "accelerated":
                summary["top1_agreement"] = 100.0 * agree / max(summary["images"], 1)
            result[name] = summary
        result["images"] = result["accelerated"]["images"]
        if result["images"] == 0:
            raise ValueError(f"--data: no image of {args.data!r} could be decoded ({corrupt} corrupt)")
        return result if rank == 0 else None
    finally:
        distributed.teardown()


def format_result(r):
    """The human-readable summary rank 0 prints."""
    lines = [f"{r['model']} ({r['pruning']}, {r['dtype']}, {r['device']}, {r['processes']} process(es), "
             f"batch {r['batch_size']}): {r['images']} images, {r['corrupt_skipped']} corrupt skipped"]
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
