"""Pretraining data: the official augmentations, the image folder, a world-size-free sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Sampler
from torchvision import transforms

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .sections import DataSection


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
