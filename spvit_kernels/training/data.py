"""Training data for `python -m spvit_kernels.train`: ImageFolders, the DeiT training pipeline, mixup / cutmix."""

from pathlib import Path

import torch

from ..evaluation.data import IMAGENET_MEAN, IMAGENET_STD, paper_transform


def train_transform(img_size, randaugment=True, reprob=0.25, color_jitter=0.4, crop_scale=(0.08, 1.0), hflip=0.5,
                    crop="random"):
    """DeiT's training transform at `img_size` (timm create_transform): random resized crop (bicubic) of
    `crop_scale` of the area, horizontal flip with probability `hflip`, RandAugment rand-m9-mstd0.5-inc1 (or
    colour jitter when it is off), ImageNet mean / std, random erasing. crop="center": the evaluate command's
    resize and centre crop instead of the random resized crop (for data whose scale must not change, e.g. small
    images whose pixels line up with the patches); flip, RandAugment (no colour jitter) and erasing as given."""
    from timm.data import auto_augment, create_transform

    if crop == "random":
        tf = create_transform(input_size=img_size, is_training=True, color_jitter=color_jitter,
                              scale=tuple(crop_scale), hflip=hflip,
                              auto_augment="rand-m9-mstd0.5-inc1" if randaugment else None,
                              interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD)
    elif crop == "center":
        from PIL import Image
        from timm.data.random_erasing import RandomErasing
        from torchvision import transforms

        ops = [transforms.Resize(int(round(img_size / 0.875)), interpolation=transforms.InterpolationMode.BICUBIC),
               transforms.CenterCrop(img_size)]
        if hflip > 0:
            ops.append(transforms.RandomHorizontalFlip(hflip))
        if randaugment:
            ops.append(auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(
                translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN),
                interpolation=Image.BICUBIC)))
        ops += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if reprob > 0:
            ops.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
        tf = transforms.Compose(ops)
    else:
        raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
    for t in getattr(tf, "transforms", ()):
        for op in getattr(t, "ops", ()) if isinstance(t, auto_augment.RandAugment) else ():
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_any_bits
    return tf


def posterize_any_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, also for 0 bits: "inc1" RandAugment keeps 4 - int(0.4 level) bits, 0 at the top level
    (magnitude 9 with std 0.5 reaches it), which Pillow >= 11 refuses ("bits must be between or equal to 1 and
    8") while the Pillow of the paper's time returned the all-zero image: that is what 0 bits gives here."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def eval_transform(img_size):
    """The evaluate command's transform at `img_size`: resize to img_size / 0.875 (256 for 224), centre crop."""
    return paper_transform(resize=int(round(img_size / 0.875)), crop=img_size)


def image_folder(root, transform, flag):
    """An ImageFolder of `root`; ValueError naming `flag` for a missing folder, an empty class or no classes."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{flag}: {str(root)!r} is not a folder")
    try:
        folder = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, PermissionError) as e:  # no class folders, or a class without images
        raise ValueError(f"{flag}: {str(root)!r}: {e}") from e
    counts = torch.bincount(torch.tensor(folder.targets), minlength=len(folder.classes))
    empty = [c for c, n in zip(folder.classes, counts.tolist()) if n == 0]
    if empty:
        raise ValueError(f"{flag}: class folder(s) {empty} of {str(root)!r} hold no image")
    return folder


def mixup_fn(num_classes, mixup=0.8, cutmix=1.0, smoothing=0.1):
    """timm's Mixup with DeiT's settings (None when both mixup and cutmix are off)."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=smoothing, num_classes=num_classes)
