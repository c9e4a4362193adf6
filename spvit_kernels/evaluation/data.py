"""The evaluation data: an ImageFolder with the paper's transform, corrupt images counted, sharded by rank."""

from pathlib import Path

import torch
from torch.utils.data import Sampler

# ImageNet mean / std (timm's IMAGENET_DEFAULT_MEAN / _STD), as the paper's evaluation uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def paper_transform(resize=256, crop=224):
    """The paper code's evaluation transform: Resize(256, bicubic) -> CenterCrop(224) -> ImageNet mean/std."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (raised with --on-corrupt error)."""


def open_image_folder(root, on_corrupt="skip", img_size=224):
    """An ImageFolder of `root` (one sub-folder per class) whose items are (image (3, img_size, img_size) or None,
    label, index), through the paper's transform at img_size (resize to img_size / 0.875, centre crop). A file that cannot be decoded gives None under on_corrupt="skip" and raises CorruptImageError
    under "error".

    Raises ValueError naming --data for a missing, unreadable or empty folder."""
    from torchvision.datasets import ImageFolder

    if on_corrupt not in ("skip", "error"):
        raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data: {str(root)!r} is not a folder")

    class _Folder(ImageFolder):
        def __getitem__(self, index):
            path, label = self.samples[index]
            try:
                image = self.loader(path)  # PIL open + convert("RGB") decodes the whole file
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on truncated / foreign data
                if on_corrupt == "error":
                    raise CorruptImageError(f"--data: cannot decode {path} ({e}); --on-corrupt skip skips such "
                                            "files") from e
                return None, label, index
            return self.transform(image), label, index

    try:
        return _Folder(str(root), transform=paper_transform(resize=int(round(img_size / 0.875)), crop=img_size))
    except (FileNotFoundError, PermissionError) as e:
        raise ValueError(f"--data: {str(root)!r} holds no readable images in class sub-folders ({e})") from e


def collate(items):
    """Batch the decodable items -> (images (B, 3, H, W) or None, labels (B,), indices (B,), dataset indices of
    the items that could not be decoded (a list))."""
    good = [it for it in items if it[0] is not None]
    labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
    images = torch.stack([it[0] for it in good]) if good else None
    return images, labels, indices, [it[2] for it in items if it[0] is None]


def calibration_sample(dataset, n, seed=0):
    """Up to n decodable images drawn uniformly (seeded) across the whole dataset, not the first files in folder
    order (which are one class): (images (m, 3, H, W) or None, the dataset indices drawn)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, drawn = [], []
    for i in order:
        if len(picked) == n:
            break
        item = dataset[i]
        if item[0] is not None:
            picked.append(item)
            drawn.append(i)
    return (torch.stack([it[0] for it in picked]) if picked else None), drawn


class ShardSampler(Sampler):
    """Indices rank, rank + world, rank + 2 world, ... of range(n): every index on exactly one rank, none
    repeated (torch's DistributedSampler pads the last shards with duplicates, which would count twice)."""

    def __init__(self, n, rank, world_size):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.n, self.world_size))
