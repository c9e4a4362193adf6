"""SPViT training on real images that ship with a package: scikit-learn's handwritten digits, end to end on a CPU.

    python python/digits_demo.py [--out DIR] [--quick]

1. The 1,797 8x8 digits (10 classes), a seeded stratified 80/20 split, each upscaled 4x (nearest) to 32x32, grey
   copied to RGB, written as PNGs into DIR/digits/{train,val}/<class>/.
2. A dense DeiT-Tiny-width ViT (timm VisionTransformer: 192 channels, 3 heads, depth 12, patch 4: 64 patches)
   trained from scratch on the train split (AdamW, one-cycle, batch 32, no augmentation), saved as DIR/dense.pth.
3. `python -m spvit_kernels.train --model spvit_deit_tiny --img-size 32 --patch-size 4 --backbone DIR/dense.pth`
   at the default keep ratios (0.617, 0.369, 0.137 of 64 patches: 39, 24, 9 kept after blocks 3, 6, 9), without
   augmentation (--train-crop center): the images as the backbone saw them; 10 epochs, the backbone frozen for
   the first 3 (--spvit-warmup) and then fine-tuned as the paper's recipe does, with --ratio-weight 20 (the
   paper's 2 lets the training keep rates run far above the targets here) and --ratio-multiplier-lr 10 (keep-ratio
   multipliers, an addition to the paper's loss: the quadratic term alone lets the rates drift up; with them the
   later stages end nearer their targets, stage 1 still ends above its own).
4. On the val split: top-1 and images/s of the dense backbone, of SPViT with the learned selectors (masked and
   accelerated), of the dense backbone with untrained (fresh) selectors; and, on the dense backbone and on
   SPViT's fine-tuned one, two selector-free baselines at the same stages and counts: random patches dropped (the
   accelerated path with random keep scores; the mean and range over --random-seeds draws) and the brightest
   patches of the input kept (a hand-made selector that reads the image: what a simple rule gains on digits).
Writes benchmarks/results/digits_demo-cpu.csv, digits_demo.md and digits_kept_tokens.png (unless --results says
otherwise). --quick: a tiny version for the tests (few images, one epoch each).
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

from spvit_kernels import accelerate  # noqa: E402
from spvit_kernels.accelerate import AcceleratedSPViT  # noqa: E402
from spvit_kernels.models import create_model, load_checkpoint  # noqa: E402
from spvit_kernels.training.data import eval_transform  # noqa: E402

MODEL = "spvit_deit_tiny"
IMG, PATCH, CLASSES = 32, 4, 10


def write_digits(root, quick, seed=0):
    """The digits as an ImageFolder (root/train, root/val, rewritten whole: no image of another split stays);
    returns (train count, val count)."""
    import shutil

    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images, digits.target
    if quick:  # 6 per class
        keep = np.concatenate([np.flatnonzero(labels == c)[:6] for c in range(CLASSES)])
        images, labels = images[keep], labels[keep]
    tr, va = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=seed)
    for split, idx in (("train", tr), ("val", va)):
        shutil.rmtree(root / split, ignore_errors=True)
        for i in idx:
            d = root / split / str(labels[i])
            d.mkdir(parents=True, exist_ok=True)
            grey = np.kron(images[i] / 16.0 * 255.0, np.ones((IMG // 8, IMG // 8))).astype(np.uint8)  # nearest 4x
            Image.fromarray(np.stack([grey] * 3, -1)).save(d / f"{i}.png")
    return len(tr), len(va)


def loaders(root, batch):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    # No augmentation for the dense backbone: in a dozen short epochs on 1,437 images it converges much faster
    # without (random shifts of a few pixels left it near 27% after 9 epochs; plain images reach ~91% in 6).
    train = ImageFolder(str(root / "train"), transform=eval_transform(IMG))
    val = ImageFolder(str(root / "val"), transform=eval_transform(IMG))
    g = torch.Generator().manual_seed(0)
    return (torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, generator=g, drop_last=True),
            torch.utils.data.DataLoader(val, batch_size=256), val)


def train_dense(root, out, epochs, batch, lr=5e-4):
    """The dense backbone from scratch: AdamW (wd 0.05), one-cycle (10% warm-up, then cosine), label smoothing
    0.1, no augmentation."""
    torch.manual_seed(0)
    vit = create_model(MODEL, num_classes=CLASSES, img_size=IMG, patch_size=PATCH).vit
    train, val, _ = loaders(root, batch)
    opt = torch.optim.AdamW(vit.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * len(train)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for epoch in range(epochs):
        vit.train()
        for x, y in train:
            loss = F.cross_entropy(vit(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"dense epoch {epoch}: val top-1 {top1(vit, val):.2f}%", flush=True)
    torch.save(vit.state_dict(), out)
    return vit


@torch.no_grad()
def top1(model, loader):
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


class RandomDropSPViT(AcceleratedSPViT):
    """The accelerated SPViT path with random keep scores: every stage keeps the same number of patches as the
    learned model, chosen uniformly at random (one generator per model, seeded by `reseed`, drawn from on every
    call: each image of each batch gets its own draw); the dropped ones are pooled with equal weights."""

    def reseed(self, seed):
        self._gen = torch.Generator().manual_seed(seed)
        return self

    def _row_scores(self, stage, image, cu, P):
        """The keep score of every packed row (higher: kept first); only the candidate rows' scores count."""
        return torch.rand(image.shape[0], generator=self._gen)

    def _prune_stage_packed(self, stage, x, cu, n_pkg, P):
        image, pos, lengths = self._row_layout(x, cu)
        cand = (pos >= self.num_prefix) & (pos < lengths[image] - n_pkg)
        if getattr(self, "_gen", None) is None:
            self.reseed(0)
        score = self._row_scores(stage, image, cu, P)
        keep_score = torch.where(cand, score, torch.full_like(score, float("inf")))
        keep_prob = torch.where(cand, torch.full_like(score, 0.5), torch.ones_like(score))
        cfg = self.config
        return torch.ops.spvit.prune_pack(x, cu, keep_score, keep_prob, n_pkg, "topk", 0.0, self.num_keep(stage, P),
                                          cfg.package, package_merge=cfg.package_merge, num_prefix=self.num_prefix)


class BrightestKeptSPViT(RandomDropSPViT):
    """A hand-made selector for digits, as a ceiling on what choosing patches can gain here: every stage keeps
    the same number of patches as the learned model, the brightest ones of the input image (mean grey of the
    4x4 patch; ties, such as blank background, broken at random), the dropped ones pooled with equal weights.
    It reads the image, which no selector sees, and it is only meaningful for these digits (white strokes on
    black)."""

    def forward(self, images, return_info=False, gumbel_noise=None):
        if not self.training:
            grey = images[:, 0].unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).mean((-1, -2))
            self._brightness = grey.reshape(images.shape[0], -1)  # (B, P), the patch order of the stem
        return super().forward(images, return_info, gumbel_noise)

    def _row_scores(self, stage, image, cu, P):
        if stage == 0:  # every row's patch id (-1: a prefix row, -2: a package row), kept in step with prune_pack
            self._ids = torch.arange(-self.num_prefix, P).clamp(min=-1).repeat(cu.shape[0] - 1)
        # Ties (blank patches: exactly equal) broken at random; 1e-3 is small against the normalised brightness
        # range (about 4.9): only patches within 1e-3 of each other (near-equal) may swap.
        return (self._brightness[image, self._ids.clamp(min=0)]
                + 1e-3 * torch.rand(image.shape[0], generator=self._gen))

    def _prune_stage_packed(self, stage, x, cu, n_pkg, P):
        out, cu_out, src = super()._prune_stage_packed(stage, x, cu, n_pkg, P)
        self._ids = torch.where(src >= 0, self._ids[src.clamp(min=0)], torch.full_like(src, -2))
        return out, cu_out, src


def _as(cls, model):
    """A copy of the SPViT `model` (its backbone and selectors) running as `cls` (a baseline's class)."""
    copied = copy.deepcopy(model)
    copied.__class__ = cls
    return copied


def images_per_s(model, images, repeats=5):
    model.eval()
    with torch.no_grad():
        model(images)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - t0)
    return images.shape[0] / sorted(times)[len(times) // 2]


def kept_picture(path, val_set, learned, random_model, n=6):
    """For n val digits: the image, then the patches each stage keeps, learned selectors vs random dropping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [int(i) for i in np.linspace(0, len(val_set) - 1, n)]
    x = torch.stack([val_set[i][0] for i in idx])
    grey = x[:, 0] * 0.229 + 0.485  # undo the normalisation (channel 0)
    with torch.no_grad():
        _, info_l = learned(x, return_info=True)
        _, info_r = random_model(x, return_info=True)
    stages = len(info_l["kept_indices"])
    fig, axes = plt.subplots(n, 1 + 2 * stages, figsize=(1.4 * (1 + 2 * stages), 1.5 * n))
    grid = IMG // PATCH
    for r in range(n):
        axes[r, 0].imshow(grey[r], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(f"label {val_set[idx[r]][1]}" if r == 0 else str(val_set[idx[r]][1]), fontsize=8)
        for s in range(stages):
            for col, info, name in ((1 + s, info_l, "learned"), (1 + stages + s, info_r, "random")):
                mask = torch.zeros(grid * grid)
                mask[info["kept_indices"][s][r]] = 1
                up = mask.view(grid, grid).repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)
                axes[r, col].imshow(grey[r] * (0.25 + 0.75 * up), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    axes[r, col].set_title(f"{name} s{s + 1}: {len(info['kept_indices'][s][r])}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("kept patches per stage (dimmed: dropped): learned selectors vs random dropping", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="digits_run", help="working folder (data, checkpoints)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the table and picture go")
    p.add_argument("--quick", action="store_true", help="a tiny version (tests)")
    p.add_argument("--dense-epochs", type=int, default=12)
    p.add_argument("--spvit-epochs", type=int, default=10)
    p.add_argument("--spvit-lr", type=float, default=2e-2, help="--lr of the train command (scaled by batch / 512)")
    p.add_argument("--spvit-warmup", type=int, default=3,
                   help="--warmup-epochs of the train command: the backbone is frozen for these epochs, then trained "
                        "at the recipe's min(0.01 lr, selector lr); >= --spvit-epochs: a frozen backbone throughout")
    p.add_argument("--ratio-weight", type=float, default=20.0,
                   help="--ratio-weight of the train command (the paper's 2 lets the training keep rates drift far "
                        "above the targets on these 64-patch images)")
    p.add_argument("--ratio-multiplier-lr", type=float, default=10.0,
                   help="--ratio-multiplier-lr of the train command (0: the paper's ratio loss only; 10 brings the "
                        "later stages' training keep rates much nearer their targets here, stage 1 still drifts up)")
    p.add_argument("--random-seeds", type=int, default=5, help="draws of the random-dropping baseline (mean, range)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the stratified 80/20 train / val split")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--reuse-dense", action="store_true",
                   help="keep OUT/dense.pth from an earlier run (the dense training is seeded: the same weights)")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUT/dense.pth and OUT/spvit/ from an earlier run of the same settings: evaluate only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    dense_epochs, spvit_epochs, batch = (1, 1, 8) if args.quick else (args.dense_epochs, args.spvit_epochs, 64)
    dense_batch = batch if args.quick else 32
    phases = {}

    t0 = time.perf_counter()
    n_train, n_val = write_digits(out / "digits", args.quick, seed=args.split_seed)
    phases["data"] = time.perf_counter() - t0

    reuse = args.reuse and (out / "dense.pth").is_file() and (out / "spvit" / "results.json").is_file()
    t0 = time.perf_counter()
    reuse_dense = reuse or (args.reuse_dense and (out / "dense.pth").is_file())
    if reuse_dense:
        dense = create_model(MODEL, num_classes=CLASSES, img_size=IMG, patch_size=PATCH).vit
        dense.load_state_dict(torch.load(out / "dense.pth", weights_only=True))
    else:
        dense = train_dense(out / "digits", out / "dense.pth", dense_epochs, dense_batch)
    phases["dense training" + (" (reused)" if reuse_dense else "")] = time.perf_counter() - t0

    warmup = min(args.spvit_warmup, spvit_epochs)
    fine_tuned = warmup < spvit_epochs
    t0 = time.perf_counter()
    spvit_out = out / "spvit"
    cmd = [sys.executable, "-m", "spvit_kernels.train", "--model", MODEL, "--data", str(out / "digits"),
           "--output", str(spvit_out), "--backbone", str(out / "dense.pth"), "--img-size", str(IMG),
           "--patch-size", str(PATCH), "--epochs", str(spvit_epochs), "--batch-size", str(batch),
           "--lr", str(args.spvit_lr), "--warmup-epochs", str(warmup), "--ratio-weight", str(args.ratio_weight),
           "--ratio-multiplier-lr", str(args.ratio_multiplier_lr), "--workers", "0",
           "--threads", str(args.threads), "--throughput-batch", str(min(256, n_val)),
           # The backbone saw one fixed scale (the evaluate transform: 32 -> 37 px, centre crop 32, so a digit pixel
           # spans ~4.6 px, not aligned with the 4-px patches): DeiT's random resized crops, flips,
           # RandAugment and mixup would train the selectors on images it cannot read (its own train-image
           # accuracy drops to ~11% under them), so the SPViT phase sees what the backbone saw.
           "--train-crop", "center", "--hflip", "0", "--no-randaugment", "--mixup", "0", "--cutmix", "0",
           "--reprob", "0"]
    if not reuse:
        subprocess.run(cmd, check=True)
    phases["SPViT fine-tuning (train command)" + (" (reused)" if reuse else "")] = time.perf_counter() - t0
    train_result = json.loads((spvit_out / "results.json").read_text())

    t0 = time.perf_counter()
    _, val_loader, val_set = loaders(out / "digits", batch)
    learned = create_model(MODEL, num_classes=CLASSES, img_size=IMG, patch_size=PATCH)
    load_checkpoint(learned, str(spvit_out / "checkpoint.pth"))
    torch.manual_seed(1)
    fresh = create_model(MODEL, num_classes=CLASSES, img_size=IMG, patch_size=PATCH)
    fresh.vit.load_state_dict(dense.state_dict())
    learned_acc = accelerate(copy.deepcopy(learned))
    images = torch.stack([val_set[i][0] for i in range(min(256, len(val_set)))])
    untrained_acc = accelerate(copy.deepcopy(fresh))
    random_drop = _as(RandomDropSPViT, fresh)
    rows = []
    kept = {"dense": f"all {(IMG // PATCH) ** 2}"}
    for name, model in (("learned", learned_acc), ("untrained", untrained_acc),
                        ("random", random_drop)):
        with torch.no_grad():
            _, info = model.eval()(images[:4], return_info=True)
        kept[name] = "/".join(str(len(s[0])) for s in info["kept_indices"])  # what the model kept, image 0
    for name, key, model, ips_model in (
            ("dense backbone", "dense", dense, dense),
            ("SPViT, learned selectors (masked)", "learned", learned, learned),
            ("SPViT, learned selectors (accelerated)", "learned", learned_acc, learned_acc),
            ("dense backbone, untrained selectors", "untrained", fresh, untrained_acc)):
        rows.append({"model": name, "top1": round(top1(model, val_loader), 2),
                     "images_per_s": round(images_per_s(ips_model, images), 1),
                     "kept_per_stage": kept[key]})
    # The selector-free baselines on the dense backbone and, when the train command fine-tuned it, on the learned
    # model's own backbone too (the weights the learned selectors run with).
    backbones = [("dense backbone", fresh)] + ([("SPViT's fine-tuned backbone", learned)] if fine_tuned else [])
    for label, source in backbones:
        # Random dropping varies with the draw: its mean over several seeds, with the range.
        model = random_drop if source is fresh else _as(RandomDropSPViT, source)
        draws = [top1(model.reseed(seed), val_loader) for seed in range(max(1, args.random_seeds))]
        rows.append({"model": f"{label}, random dropping (mean of {len(draws)} draws)",
                     "top1": round(float(np.mean(draws)), 2), "images_per_s": round(images_per_s(model, images), 1),
                     "kept_per_stage": kept["random"], "top1_min": round(min(draws), 2),
                     "top1_max": round(max(draws), 2)})
        model = _as(BrightestKeptSPViT, source)
        rows.append({"model": f"{label}, brightest patches kept (hand-made, reads the image)",
                     "top1": round(top1(model, val_loader), 2), "images_per_s": round(images_per_s(model, images), 1),
                     "kept_per_stage": kept["random"]})
    phases["evaluation"] = time.perf_counter() - t0
    kept_picture(results / "digits_kept_tokens.png", val_set, learned.eval(), random_drop.eval())

    meta = {"data": f"sklearn load_digits: {n_train} train / {n_val} val (split seed {args.split_seed}), 8x8 -> 32x32 "
                    "nearest, RGB",
            "backbone": "timm VisionTransformer 192 ch, 3 heads, depth 12, patch 4 (64 patches), from scratch, "
                        f"{dense_epochs} epochs, batch {dense_batch}, AdamW 5e-4 one-cycle, no augmentation, label "
                        "smoothing 0.1",
            "spvit": f"python -m spvit_kernels.train, {spvit_epochs} epochs, batch {batch}, --lr {args.spvit_lr} "
                     f"(scaled x{batch}/512), "
                     + ("backbone frozen (warm-up = all epochs)" if not fine_tuned else
                        f"backbone frozen for {warmup} warm-up epochs, then trained at min(0.01 lr, selector lr)")
                     + f", --ratio-weight {args.ratio_weight}"
                     + (f", --ratio-multiplier-lr {args.ratio_multiplier_lr}" if args.ratio_multiplier_lr else "")
                     + ", no augmentation (--train-crop center, as the backbone "
                       "was trained), keep ratios 0.617/0.369/0.137",
            "images_per_s": f"float32, batch {len(images)}, {args.threads} threads, median of 5",
            "phases_s": "; ".join(f"{k} {v:.0f}" for k, v in phases.items()),
            "train_command_results": json.dumps({k: train_result[k] for k in ("masked", "accelerated",
                                                                             "prediction_disagreements")})}
    if not args.quick:
        common.write_csv("digits_demo", "cpu", rows, meta, label="cpu", results_dir=str(results))
    lines = ["| model | top-1 % | images/s | patches kept per stage |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['top1']:.2f}" + (f" ({r['top1_min']:.2f}-{r['top1_max']:.2f})" if "top1_min" in r
                                                      else "")
              + f" | {r['images_per_s']:.1f} | {r['kept_per_stage']} |" for r in rows]
    text = "\n".join(["# SPViT on scikit-learn's digits (CPU)", "", *lines, "",
                      *[f"- {k}: {v}" for k, v in {**common.provenance("cpu"), **meta}.items()]])
    (results / ("digits_demo_quick.md" if args.quick else "digits_demo.md")).write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
