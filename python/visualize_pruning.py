"""Draw which patches an SPViT model keeps after each pruning stage (like Figure 10 of the SPViT paper).

    python python/visualize_pruning.py [--image PATH] [--model spvit_deit_small] [--checkpoint CKPT]
                                       [--pruning topk|threshold] [--threshold T] [--package-merge concat|add]
                                       [--num-classes N] [--img-size S] [--patch-size P] [--threads N]
                                       [--out pruning.png]

--model takes any create_model name at 224 px (DeiT, distilled DeiT, LV-ViT, PiT). Each panel shows the
grid its stage prunes: 14 x 14 for the ViTs; for PiT each stage's own grid (27 x 27, 14 x 14, 7 x 7), its
cells spread evenly over the image (PiT's stem patches overlap, so a cell marks where its patch centres).
--package-merge defaults to the model's own default (concat; PiT supports add only).

Without --image it uses the sample photo that matplotlib ships (grace_hopper.jpg). Without --checkpoint
the model has random weights: the picture is still drawn, and its title says that the kept patches then
mean nothing. A checkpoint is anything `spvit_kernels.models.load_checkpoint` reads (our state_dict, the paper
code's checkpoint, the train command's checkpoint.pth / best.pth); --num-classes defaults to its head's size, and
--img-size / --patch-size must be the model's (as for the evaluate and train commands).

Threshold mode uses --threshold for every stage if given; otherwise it calibrates per-stage thresholds on the
image itself (`calibrate_thresholds`) so that each stage keeps about its keep ratio, and the title says so.

The kept patches come from `model(images, return_info=True)` of the accelerated model, i.e. the tokens
that really flow through the later blocks.
"""

import argparse
import os

import numpy as np
import torch

from spvit_kernels import accelerate
from spvit_kernels.models import CheckpointError, calibrate_thresholds, create_model, list_models, load_checkpoint
from spvit_kernels.models.checkpoint import checkpoint_num_classes, read_checkpoint

MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation used by DeiT
STD = (0.229, 0.224, 0.225)


def sample_image_path():
    import matplotlib.cbook

    return matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def load_image(path, size):
    """RGB image resized (shorter side) and centre-cropped to size x size, as a float array in [0, 1]."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0


def to_batch(pixels):
    """(H, W, 3) in [0, 1] -> the normalised (1, 3, H, W) batch the model takes."""
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    return ((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])[None]


def kept_patches(model, pixels, patch=16):
    """Per stage, the kept patch indices of the one image in `pixels` (H, W, 3 in [0, 1]), the blocks the
    selectors sit before, and the (rows, cols) of the grid each stage prunes (PiT: info["grid_sizes"];
    otherwise the image side / patch)."""
    with torch.inference_mode():
        _, info = model(to_batch(pixels), return_info=True)
    kept = [stage[0].tolist() for stage in info["kept_indices"]]
    side = pixels.shape[0] // patch
    grids = info.get("grid_sizes", [(side, side)] * len(kept))
    return kept, info["selector_layers"], grids


def cell_mask(ids, grid, size):
    """(size, size) bool: pixel (y, x) is shown iff its cell of the (rows, cols) `grid` spread over the
    image is in `ids` (row-major cell numbers)."""
    rows, cols = grid
    keep = np.zeros(rows * cols, dtype=bool)
    keep[ids] = True
    r = np.arange(size) * rows // size
    c = np.arange(size) * cols // size
    return keep.reshape(rows, cols)[r[:, None], c[None, :]]


def draw(pixels, kept, layers, grids, out, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kept) + 1, figsize=(3.2 * (len(kept) + 1), 3.6))
    axes[0].imshow(pixels)
    axes[0].set_title("input")
    for stage, (ax, ids, layer, grid) in enumerate(zip(axes[1:], kept, layers, grids), start=1):
        total = grid[0] * grid[1]
        mask = cell_mask(ids, grid, pixels.shape[0])
        shown = pixels * mask[..., None] + (1 - mask[..., None]) * 0.92  # dropped patches fade to light grey
        ax.imshow(shown)
        ax.set_title(f"stage {stage} (before block {layer}): {len(ids)}/{total} kept", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=None, help="image path (default: matplotlib's sample photo)")
    p.add_argument("--model", default="spvit_deit_small", choices=list_models())
    p.add_argument("--checkpoint", default=None, help="state_dict of the SPViT model (torch.save)")
    p.add_argument("--pruning", default="topk", choices=("topk", "threshold"))
    p.add_argument("--threshold", type=float, default=None,
                   help="threshold mode: keep_score threshold of every stage (default: calibrated on the image)")
    p.add_argument("--package-merge", default=None, choices=("concat", "add"),
                   help="package tokens: one per stage (concat) or one in total (add); default: the model's")
    p.add_argument("--num-classes", type=int, help="the model's classes (default: the checkpoint's head, or 1000)")
    p.add_argument("--img-size", type=int, default=224, help="the model's image size")
    p.add_argument("--patch-size", type=int, help="the backbone's patch size (DeiT / LV-ViT; default 16)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="pruning.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = {"threshold": args.threshold} if args.threshold is not None else {}
    if args.package_merge is not None:
        cfg["package_merge"] = args.package_merge
    state = None
    if args.checkpoint:
        try:
            state = read_checkpoint(args.checkpoint)
        except (CheckpointError, FileNotFoundError) as e:
            p.error(f"--checkpoint: {str(e).replace(' (path_or_state_dict)', '')}")
    num_classes = args.num_classes or (checkpoint_num_classes(state) if state is not None else None) or 1000
    sizes = {"img_size": args.img_size, **({"patch_size": args.patch_size} if args.patch_size else {})}
    model = create_model(args.model, pruning=args.pruning, num_classes=num_classes, **sizes, **cfg)
    if state is not None:
        try:
            load_checkpoint(model, state)
        except CheckpointError as e:
            p.error(f"--checkpoint {args.checkpoint}: {e}")
        title = f"{args.model} ({args.pruning}), weights from {os.path.basename(args.checkpoint)}"
    else:
        title = (f"{args.model} ({args.pruning}) with RANDOM weights: the kept patches show the mechanism, "
                 "not what a trained model keeps")
    model = accelerate(model.eval())
    image = args.image or sample_image_path()
    pixels = load_image(image, args.img_size)
    if args.pruning == "threshold" and args.threshold is None:
        with torch.inference_mode():
            thresholds = calibrate_thresholds(model, to_batch(pixels))
        title += "\nthresholds calibrated on this image to the keep ratios: " + \
            ", ".join(f"{t:.3g}" for t in thresholds)
    kept, layers, grids = kept_patches(model, pixels, patch=args.patch_size or 16)
    draw(pixels, kept, layers, grids, args.out, title)
    print(f"wrote {args.out} ({os.path.basename(image)}; kept per stage: {[len(k) for k in kept]})")
    return kept


if __name__ == "__main__":
    main()
