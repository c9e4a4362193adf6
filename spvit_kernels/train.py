"""Fine-tune SPViT's token selectors on a pretrained backbone, as the paper code does, from an ImageFolder.

    python -m spvit_kernels.train --model spvit_deit_small --data DIR --output OUT --backbone deit_small.pth
    torchrun --standalone --nproc-per-node 8 -m spvit_kernels.train --model ... (data-parallel; gloo on CPU)

DIR holds train/ and val/ ImageFolders (or give --train-dir / --val-dir). The backbone checkpoint (a plain timm /
DeiT / LV-ViT / PiT state dict) is both the student's backbone and the dense teacher. Defaults are the paper's
recipe (main_l2_vit_3keep_senet.py): 30 epochs, AdamW, weight decay 0.05 (none on biases and norms), selector lr
5e-4 x global batch / 512 cosine to 1e-5, backbone lr 0 for 5 warm-up epochs then min(0.01 lr, selector lr),
class token and position embedding frozen, DeiT augmentation (RandAugment m9, mixup 0.8, cutmix 1.0, label
smoothing 0.1, random erasing 0.25), drop path 0.1, loss weights 1 / 2 / 0.5 (classification / ratio /
distillation). OUT receives checkpoint.pth (every epoch; --resume continues from it exactly), best.pth (best
validation top-1 of the masked model), log.csv (one row per epoch) and results.json (the final model's top-1 /
top-5 masked and accelerated, images/s of the accelerated model against the dense backbone, kept tokens per
stage, provenance).
"""

import argparse
import contextlib
import copy
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from ._cli import HelpFormatter

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_FIELDS = ("epoch", "lr_selectors", "lr_backbone", "clf", "ratio", "cls_kl", "token", "total", "kept",
              "ratio_multipliers", "val_top1_masked", "seconds")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m spvit_kernels.train", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    from .models import list_models

    p.add_argument("--model", required=True, choices=list_models(), metavar="NAME",
                   help="one of: " + ", ".join(list_models()))
    p.add_argument("--data", help="a folder with train/ and val/ ImageFolders")
    p.add_argument("--train-dir", help="the training ImageFolder (instead of DATA/train)")
    p.add_argument("--val-dir", help="the validation ImageFolder (instead of DATA/val)")
    p.add_argument("--output", required=True, help="folder for checkpoint.pth, best.pth, log.csv, results.json")
    p.add_argument("--backbone", help="a plain backbone state dict: the student's backbone and the teacher")
    p.add_argument("--num-classes", type=int, help="default: the training folder's class count")
    p.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps per optimiser step")
    p.add_argument("--lr", type=float, default=5e-4, help="selector lr for a global batch of 512 (scaled linearly)")
    p.add_argument("--min-lr", type=float, default=1e-5, help="selector lr at the end of the cosine")
    p.add_argument("--warmup-epochs", type=int, default=5, help="epochs with backbone lr 0")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay (not on biases and norms)")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (default: no clipping)")
    p.add_argument("--img-size", type=int, default=224, help="image side (the backbone is built at it)")
    p.add_argument("--patch-size", type=int, help="the backbone's patch size (DeiT / LV-ViT; default 16)")
    p.add_argument("--keep-ratios", type=float, nargs="+", help="per-stage keep ratios (default: the model's)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the student")
    p.add_argument("--ratio-weight", type=float, default=2.0, help="weight of the keep-ratio loss")
    p.add_argument("--ratio-multiplier-lr", type=float, default=0.0,
                   help="0: the paper's ratio loss; > 0: also a Lagrange multiplier per stage (>= 0, moved by this "
                        "step size after every step) that holds each training keep ratio at or below its target")
    p.add_argument("--distill-weight", type=float, default=0.5, help="weight of each distillation loss")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (0: off)")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (0: off)")
    p.add_argument("--no-randaugment", action="store_true", help="turn RandAugment (m9) off")
    p.add_argument("--train-crop", choices=("random", "center"), default="random",
                   help="random: DeiT's random resized crop; center: the evaluate command's resize and centre crop "
                        "(images whose scale must not change)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="area range of the random resized crop")
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (0: off)")
    p.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (decay --ema-decay)")
    p.add_argument("--ema-decay", type=float, default=0.99996, help="decay of --model-ema")
    p.add_argument("--amp", choices=tuple(AMP), default="none", help="autocast dtype")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: fits cores)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: cores / processes)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator (per rank: seed + rank)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pth")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    p.add_argument("--throughput-batch", type=int, default=64, help="batch of the final images/s comparison")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p, args):
    """Flag errors that need no data: one line naming the flag (exit code 2)."""
    if args.data is None and (args.train_dir is None or args.val_dir is None):
        p.error("--data (with train/ and val/) or both --train-dir and --val-dir are required")
    if args.data is not None and not Path(args.data).is_dir():
        p.error(f"--data: {args.data!r} is not a folder")
    args.train_dir = args.train_dir or os.path.join(args.data, "train")
    args.val_dir = args.val_dir or os.path.join(args.data, "val")
    for flag in ("train_dir", "val_dir"):
        if not Path(getattr(args, flag)).is_dir():
            p.error(f"--{flag.replace('_', '-')}: {getattr(args, flag)!r} is not a folder")
    for name in ("epochs", "batch_size", "accum", "img_size", "throughput_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_epochs", "weight_decay", "min_lr", "drop_path", "ratio_weight", "ratio_multiplier_lr",
                 "distill_weight", "mixup", "cutmix", "smoothing", "reprob"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    lo, hi = args.crop_scale
    if not 0 < lo <= hi <= 1:
        p.error(f"--crop-scale must be 0 < MIN <= MAX <= 1, got {lo} {hi}")
    if not 0 <= args.hflip <= 1:
        p.error(f"--hflip must be a probability in [0, 1], got {args.hflip}")
    if args.num_classes is not None and args.num_classes < 1:
        p.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.patch_size is not None and "pit" in args.model:
        p.error(f"--patch-size: {args.model}'s stem is fixed by timm's PiT; leave --patch-size unset")
    if args.patch_size is not None and (args.patch_size < 1 or args.img_size % args.patch_size):
        p.error(f"--patch-size {args.patch_size} must divide --img-size {args.img_size}")
    if args.backbone is not None and not Path(args.backbone).is_file():
        p.error(f"--backbone: no file {args.backbone!r}")
    if args.resume and not (Path(args.output) / "checkpoint.pth").is_file():
        p.error(f"--resume: no checkpoint.pth in --output {args.output!r}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here")
    if args.amp == "fp16" and (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
        p.error("--amp fp16 needs a GPU (float16 autocast with a gradient scaler); use --amp bf16 on the CPU")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")


def _provenance(device):
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": name, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def build_model(args, num_classes):
    """(student SPViT model, dense teacher): the backbone loaded into both. ValueError naming the flag."""
    from .models import CheckpointError, create_model, load_checkpoint

    cfg = {"num_classes": num_classes, "img_size": args.img_size, "drop_path_rate": args.drop_path}
    if args.patch_size is not None:
        cfg["patch_size"] = args.patch_size
    if args.keep_ratios is not None:
        cfg["keep_ratios"] = tuple(args.keep_ratios)
    try:
        model = create_model(args.model, **cfg)
    except (ValueError, TypeError) as e:
        flag = "--keep-ratios" if "keep_ratios" in str(e) else "--model"
        raise ValueError(f"{flag}: {e}") from e
    if args.backbone is not None:
        try:
            with warnings.catch_warnings():  # "selectors stay fresh": what fine-tuning starts from
                warnings.simplefilter("ignore")
                load_checkpoint(model, args.backbone)
        except CheckpointError as e:
            lines = str(e).splitlines()
            raise ValueError(f"--backbone {args.backbone}: does not fit {args.model} with --num-classes "
                             f"{num_classes}, --img-size {args.img_size}, --patch-size {args.patch_size or 16}: "
                             + "; ".join(lines[:3]) + (f" (+{len(lines) - 3} more)" if len(lines) > 3 else "")) from e
    teacher = copy.deepcopy(model.vit)
    return model, teacher


def _loaders(args, train_set, val_set, rank, world, device):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from .evaluation.data import ShardSampler

    # One sampler for one process or many: shuffled by (seed, epoch), so a resumed run sees the same order.
    train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                       drop_last=True)
    workers = args.workers
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) // max(world, 1) - 1))
    pin = device.type == "cuda"
    if len(train_set) // world < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size}: the training folder has {len(train_set)} images, fewer "
                         f"than one batch per process ({world} process(es))")
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, persistent_workers=False)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=ShardSampler(len(val_set), rank, world),
                            num_workers=workers, pin_memory=pin)
    return train_sampler, train_loader, val_loader


def run(args):
    from . import accelerate
    from .evaluation import distributed
    from .training import SPViTLoss, lr_at_epoch, param_groups, scaled_lr, set_lr
    from .training import checkpointing, data, loop

    rank, world, device = distributed.setup(args.device)
    try:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
        out_dir = Path(args.output)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        train_set = data.image_folder(args.train_dir, data.train_transform(
            args.img_size, randaugment=not args.no_randaugment, reprob=args.reprob, crop_scale=args.crop_scale,
            hflip=args.hflip, crop=args.train_crop), "--train-dir" if args.data is None else "--data")
        val_set = data.image_folder(args.val_dir, data.eval_transform(args.img_size),
                                    "--val-dir" if args.data is None else "--data")
        classes = len(train_set.classes)
        num_classes = args.num_classes or classes
        if classes > num_classes:
            raise ValueError(f"--num-classes {num_classes}: the training folder has {classes} classes")
        if val_set.classes != train_set.classes[:len(val_set.classes)]:
            raise ValueError(f"--data: the validation classes {val_set.classes[:5]}... differ from the training "
                             f"classes {train_set.classes[:5]}...")
        torch.manual_seed(args.seed)  # the same initial selectors on every rank
        model, teacher = build_model(args, num_classes)
        model.to(device)
        teacher.to(device)
        token_loss = "kl" if "lvvit" in args.model else "mse"
        loss_fn = SPViTLoss(teacher, model.config.keep_ratios, ratio_weight=args.ratio_weight,
                            distill_weight=args.distill_weight, token_loss=token_loss,
                            ratio_multiplier_lr=args.ratio_multiplier_lr)
        optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV2

            ema = ModelEmaV2(model, decay=args.ema_decay)
        lr = scaled_lr(args.lr, args.batch_size * world * args.accum)
        start_epoch, best = 0, -1.0
        if args.resume:
            state = checkpointing.load(out_dir / "checkpoint.pth")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state["scaler"] is not None:
                scaler.load_state_dict(state["scaler"])
            if ema is not None and state["model_ema"] is not None:
                ema.module.load_state_dict(state["model_ema"])
            if state.get("ratio_multipliers") is not None:
                loss_fn.ratio_multipliers.copy_(state["ratio_multipliers"])
            start_epoch, best = state["epoch"] + 1, state["best_top1"]
            checkpointing.set_rng_state(state["rng"][rank if rank < len(state["rng"]) else 0])
        else:  # each rank its own augmentation (numpy: mixup, Python: RandAugment) and Gumbel noise (torch)
            checkpointing.seed_all(args.seed + rank)
        # find_unused_parameters: a parameter can get no gradient in a step (e.g. LV-ViT's aux head when the last
        # stage keeps no patch, or a selector whose tokens are all dropped earlier); DDP must not wait for it.
        train_model = model
        if world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        train_sampler, train_loader, val_loader = _loaders(args, train_set, val_set, rank, world, device)
        mixup = data.mixup_fn(num_classes, args.mixup, args.cutmix, args.smoothing)
        amp_dtype = AMP[args.amp]
        log_path = out_dir / "log.csv"
        if rank == 0 and not args.resume:
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_FIELDS)
        # Bad input is a ValueError raised before this point (main prints it as one line); one raised while
        # training is a failure of the run, which must show its traceback, not pass for a usage error.
        try:
            for epoch in range(start_epoch, args.epochs):
                t0 = time.perf_counter()
                train_sampler.set_epoch(epoch)
                sel_lr, bb_lr = lr_at_epoch(epoch, args.epochs, lr, args.min_lr, args.warmup_epochs)
                set_lr(optimizer, sel_lr, bb_lr)
                stats = loop.train_one_epoch(train_model, loss_fn, train_loader, optimizer, device=device, epoch=epoch,
                                             accum=args.accum, scaler=scaler, amp_dtype=amp_dtype, mixup=mixup, ema=ema,
                                             clip_grad=args.clip_grad, show=rank == 0)
                val = loop.evaluate(model, val_loader, device, amp_dtype)
                seconds = time.perf_counter() - t0
                rng = [checkpointing.rng_state()]
                if world > 1:
                    import torch.distributed as dist

                    gathered = [None] * world
                    dist.all_gather_object(gathered, rng[0])
                    rng = gathered
                if rank == 0:
                    kept = "/".join(f"{r:.4f}" for r in stats["kept"])
                    multipliers = "/".join(f"{m:.4f}" for m in loss_fn.ratio_multipliers.tolist())
                    with open(log_path, "a", newline="") as f:
                        csv.writer(f).writerow([epoch, sel_lr, bb_lr, *(round(stats[k], 6) for k in loop.LOSS_TERMS),
                                                kept, multipliers, round(val["top1"], 4), round(seconds, 2)])
                    print(f"epoch {epoch}: loss {stats['total']:.4f} (clf {stats['clf']:.4f}, "
                          f"ratio {stats['ratio']:.4f},"
                          f" cls_kl {stats.get('cls_kl', 0):.4f}, token {stats.get('token', 0):.4f}) kept {kept} "
                          f"val top-1 {val['top1']:.2f}% ({seconds:.1f} s)", flush=True)
                    improved = val["top1"] > best
                    best = max(best, val["top1"])
                    checkpointing.save(out_dir / "checkpoint.pth", model=model, optimizer=optimizer, scaler=scaler,
                                       ema=ema, epoch=epoch, args=args, best_top1=best, rng=rng,
                                       ratio_multipliers=loss_fn.ratio_multipliers)
                    if improved:
                        torch.save({"model": model.state_dict(), "epoch": epoch, "val_top1": val["top1"]},
                                   out_dir / "best.pth")
                else:
                    best = max(best, val["top1"])
        except ValueError as e:
            raise RuntimeError(f"training failed: {type(e).__name__}: {e}") from e
        result = final_report(args, model, val_loader, val_set, device, amp_dtype, accelerate, loop)
        if rank == 0:
            result["provenance"] = _provenance(device)
            result["processes"] = world
            with open(out_dir / "results.json", "w") as f:
                json.dump(result, f, indent=2)
            return result
        return None
    finally:
        distributed.teardown()


def final_report(args, model, val_loader, val_set, device, amp_dtype, accelerate, loop):
    """Top-1 / top-5 of the final model, masked and accelerated (and how many predictions differ), the kept tokens
    per stage, and images/s of the accelerated model against the dense backbone (rank 0's share of the data)."""
    masked, masked_pred = loop.evaluate(model, val_loader, device, amp_dtype, return_kept=True)
    fast = accelerate(copy.deepcopy(model)).eval()
    accelerated, fast_pred = loop.evaluate(fast, val_loader, device, amp_dtype, return_kept=True)
    n = min(args.throughput_batch, len(val_set))
    images = torch.stack([val_set[i][0] for i in range(n)]).to(device)
    speed = {}
    for name, m in (("accelerated", fast), ("dense", model.vit)):
        with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()):
            speed[name] = loop.images_per_second(m, images)
    return {"model": args.model, "num_classes": model.vit.num_classes if hasattr(model.vit, "num_classes") else None,
            "img_size": args.img_size, "patch_size": args.patch_size, "epochs": args.epochs,
            "keep_ratios": list(model.config.keep_ratios), "selector_layers": list(model.config.selector_layers),
            "masked": masked, "accelerated": accelerated,
            "prediction_disagreements": int((masked_pred != fast_pred).sum()),
            "tokens_per_stage": accelerated["mean_tokens_per_stage"],
            "images_per_s": {"accelerated": speed["accelerated"], "dense": speed["dense"],
                             "speedup": speed["accelerated"] / speed["dense"], "batch": n,
                             "dtype": args.amp if amp_dtype is not None else "float32"}}


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {str(e).strip()}", file=sys.stderr)
        return 2
    if result is not None:
        m, a, s = result["masked"], result["accelerated"], result["images_per_s"]
        print(f"{args.model}: val top-1 masked {m['top1']:.2f}%, accelerated {a['top1']:.2f}% "
              f"({result['prediction_disagreements']} predictions differ); tokens per stage "
              + ", ".join(f"{t:.1f}" for t in result["tokens_per_stage"])
              + f"; {s['accelerated']:.1f} images/s accelerated vs {s['dense']:.1f} dense ({s['speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
