"""Pretraining data: the official augmentations, the image folder, a world-size-free sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Sampler
from torchvision import transforms

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class DataSection:
    """The official ``data`` section, with the toolkit's one folder key: images come from
    ``train_folder`` (class sub-folders; labels unused), the official ``root_path/image_folder``.
    ``digits_root`` builds scikit-learn's digits there and trains on them instead. kNN / LiDAR
    probes use ``knn_train_folder`` / ``knn_val_folder`` (the digits splits for ``digits_root``).
    """

    train_folder: str = ""  # ImageFolder of the training images (official root_path/image_folder)
    digits_root: Optional[str] = None  # build scikit-learn's digits here and use them (demo/tests)
    batch_size: int = 128  # per process
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    use_horizontal_flip: bool = False
    use_color_distortion: bool = False
    color_jitter_strength: float = 0.0
    use_gaussian_blur: bool = False
    num_workers: int = 10
    pin_mem: bool = True
    knn_train_folder: Optional[str] = None
    knn_val_folder: Optional[str] = None

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lo, hi = self.crop_scale
        return [
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("crop_size", self.crop_size, self.crop_size >= 1, ">= 1"),
            ("crop_scale", self.crop_scale, 0 < lo <= hi <= 1,
             "[min, max] with 0 < min <= max <= 1"),
            ("color_jitter_strength", self.color_jitter_strength,
             self.color_jitter_strength >= 0, ">= 0"),
            ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0"),
            ("train_folder", self.train_folder, not (self.train_folder and self.digits_root),
             "empty when data.digits_root is set (give one of the two)"),
        ]  # fmt: skip


def pretrain_transform(cfg: DataSection) -> transforms.Compose:
    """The official ``make_transforms``: random resized crop, optional flip, colour distortion
    (jitter 0.8s/0.8s/0.8s/0.2s with p 0.8, grayscale p 0.2) and blur (sigma 0.1-2, p 0.5),
    then ImageNet normalisation. Output (3, crop_size, crop_size)."""
    steps: list = [transforms.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.crop_scale))]
    if cfg.use_horizontal_flip:
        steps.append(transforms.RandomHorizontalFlip())
    if cfg.use_color_distortion:
        s = cfg.color_jitter_strength
        jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        steps += [transforms.RandomApply([jitter], p=0.8), transforms.RandomGrayscale(p=0.2)]
    if cfg.use_gaussian_blur:
        kernel = 2 * (cfg.crop_size // 20) + 1
        blur = transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))
        steps.append(transforms.RandomApply([blur], p=0.5))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def resolve_folders(cfg: DataSection) -> tuple[Path, Optional[Path], Optional[Path]]:
    """(training folder, kNN train folder, kNN val folder) of the config."""
    if cfg.digits_root:
        from ..data.digits import build_digits_imagefolder

        train, val = build_digits_imagefolder(cfg.digits_root, size=cfg.crop_size)
        return train, train, val
    folder = Path(cfg.train_folder)
    knn_train = Path(cfg.knn_train_folder) if cfg.knn_train_folder else None
    knn_val = Path(cfg.knn_val_folder) if cfg.knn_val_folder else None
    return folder, knn_train, knn_val


class GlobalBatchSampler(Sampler):
    """Batches of indices: step ``i``'s global batch is slice ``i`` of a permutation seeded by
    ``seed + epoch``, and rank ``r`` gets its ``r``-th part of ``batch_size`` indices.

    So one process with batch ``W * b`` sees exactly the images that ``W`` ranks with batch ``b``
    see, in the same order (the drop-last tail is never used).
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):  # fmt: skip
        if size < batch_size * world_size:
            raise ValueError(
                f"{size} images are fewer than one global batch ({batch_size} x {world_size})"
            )
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.size, generator=g)
        global_batch = self.batch_size * self.world_size
        for i in range(len(self)):
            start = i * global_batch + self.rank * self.batch_size
            yield perm[start : start + self.batch_size].tolist()
