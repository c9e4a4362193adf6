"""Training data for `python -m spvit_kernels.train`: ImageFolders, the DeiT training pipeline, mixup / cutmix."""

from pathlib import Path

import torch

from ..evaluation.data import IMAGENET_MEAN, IMAGENET_STD, paper_transform


def train_transform(img_size, randaugment=True, reprob=0.25, color_jitter=0.4):
    """DeiT's training transform at `img_size` (timm create_transform): random resized crop (bicubic), flip,
    RandAugment rand-m9-mstd0.5-inc1 (or colour jitter when it is off), ImageNet mean / std, random erasing."""
    from timm.data import create_transform

    return create_transform(input_size=img_size, is_training=True, color_jitter=color_jitter,
                            auto_augment="rand-m9-mstd0.5-inc1" if randaugment else None,
                            interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


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
