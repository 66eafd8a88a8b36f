"""Label-free and kNN monitoring during pretraining: kNN and LiDAR of the target encoder
(toolkit), or LiDAR of the context encoder on the featurenorm seed's views (``featurenorm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.folder import SafeImageFolder, collate_skip_none
from ..data.transforms import eval_transform
from ..engine.utils import autocast
from ..errors import UserError
from ..eval.knn import knn_features
from ..eval.rank import lda_eigenvalues, lidar, smooth_rank, view_features
from .packing import encode_packed, per_image_mean
from .seed_views import SeedViews, ViewOptions, keeps, views_batch


@torch.no_grad()
def folder_features(
    encoder: torch.nn.Module, folder: Path, img_size: int, device: torch.device,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N, D) average-pooled final-norm tokens and (N,) labels of an image folder (centre crop).

    The global RNG is left untouched (the loader has its own generator), so a probe does not
    change the training run it monitors.
    """
    ds = SafeImageFolder(folder, transform=eval_transform(img_size, crop_ratio=1.0))
    loader = DataLoader(
        ds, batch_size=batch_size, collate_fn=collate_skip_none, generator=torch.Generator()
    )
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, targets in loader:
        feats.append(encoder(images.to(device)).float().cpu())
        labels.append(targets)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_probe(
    encoder: torch.nn.Module, train_folder: Path, val_folder: Path, img_size: int,
    device: torch.device, k: int = 20,
) -> float:  # fmt: skip
    """Top-1 (%) of the weighted kNN classifier (k neighbours, T 0.07) on pooled features."""
    x_tr, y_tr = folder_features(encoder, train_folder, img_size, device)
    x_va, y_va = folder_features(encoder, val_folder, img_size, device)
    return knn_features(x_tr, y_tr, x_va, y_va, ks=(k,))[f"top1@k{k}"]


@torch.no_grad()
def lidar_probe(
    encoder: torch.nn.Module, folder: Path, transform, device: torch.device,
    images: int = 256, views: int = 4,
) -> float:  # fmt: skip
    """LiDAR of the pooled features of ``views`` augmented views of the first ``images`` images.

    Runs inside ``torch.random.fork_rng`` so the training RNG stream is unchanged.
    """
    ds = SafeImageFolder(folder, transform=transform, on_error="raise")
    was_training = encoder.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        feats = view_features(encoder, ds, range(min(images, len(ds))), views, device=device)
    encoder.train(was_training)
    return lidar(feats)


def featurenorm_lidar(feats: torch.Tensor, delta: float = 1e-6, eps: float = 1e-6) -> float:
    """The featurenorm seed's ``compute_lidar_score`` of (n, q, D) features (``src/lidar.py``,
    theAdamColton/elucidating-featurenorm-ijepa@eb093c21): LiDAR with ``delta`` 1e-6 and
    ``eps`` 1e-6, and 1.0 when the LDA eigenvalues sum to at most ``eps``. Float64 here (the
    seed runs float32; tests/test_pretrain_seed_modes.py compares both)."""
    values = lda_eigenvalues(feats, delta)
    if float(values.sum()) <= eps:
        return 1.0
    return smooth_rank(values, eps)


def seed_images(dataset: SafeImageFolder, n: int, options: ViewOptions, seed: int) -> list:
    """The first ``n`` readable images of a fixed random order of ``dataset`` (seeded) that pass
    the seed's ``ImageSizeFilter`` (the seed takes its dataset's first ``n`` of shuffled shards)."""
    images = []
    for i in np.random.default_rng(seed).permutation(len(dataset)):
        item = dataset[int(i)]
        if item is not None and keeps(item[0].size, options):
            images.append(item[0])
            if len(images) == n:
                break
    if not images:
        raise UserError(f"{dataset.root}: no readable image of mean side >= {options.min_side} px")
    return images


def view_batches(sampler: SeedViews, pictures: list, views: int, batch_size: int):
    """Lists of at most ``batch_size`` views: ``views`` of each picture, drawn picture after
    picture (the seed's order), made only when their batch is due."""
    batch = []
    for picture in pictures:
        for _ in range(views):
            batch.append(sampler(picture))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


@torch.no_grad()
def context_features(encoder: torch.nn.Module, views: list, patch: int, device: torch.device,
                     tome: Sequence = (), **tome_options: str) -> torch.Tensor:  # fmt: skip
    """(len(views), D) mean over each view's context tokens of the encoder's output (final
    norm); every view is one packed row, padding masked out."""
    b = views_batch(views, patch).to(device)
    with autocast(device):
        tokens = encode_packed(encoder, b.ctx_px, b.ctx_ids, b.ctx_gsample, b.grids, tome,
                               **tome_options)  # fmt: skip
    return per_image_mean(tokens.float(), b.ctx_gsample, len(views)).cpu()


def featurenorm_lidar_probe(
    encoder: torch.nn.Module, folder: Path, options: ViewOptions, device: torch.device,
    images: int = 1000, views: int = 50, batch_size: int = 256, seed: int = 0,
    tome: Sequence = (), **tome_options: str,
) -> float:  # fmt: skip
    """The seed's pretraining LiDAR (``Trainer.compute_lidar_score``): ``views`` views of each of
    ``images`` images (``seed_views.SeedViews``: random resize, random context windows; the same
    views at every call), ``encoder`` (the context encoder) in eval mode, features the mean over
    the context tokens, ``featurenorm_lidar``. The training RNG is not touched."""
    dataset = SafeImageFolder(folder)
    pictures = seed_images(dataset, images, options, seed)
    sampler = SeedViews(options, resize_seed=seed, split_seed=seed + 1)
    was_training = encoder.training
    encoder.eval()
    feats = torch.cat([
        context_features(encoder, batch, options.patch, device, tome, **tome_options)
        for batch in view_batches(sampler, pictures, views, batch_size)
    ])  # fmt: skip
    encoder.train(was_training)
    return featurenorm_lidar(feats.reshape(len(pictures), views, -1))
