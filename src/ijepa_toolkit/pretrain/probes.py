"""Label-free and kNN monitoring of the target encoder during pretraining."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data.folder import SafeImageFolder, collate_skip_none
from ..data.transforms import eval_transform
from ..eval.knn import knn_features
from ..eval.rank import lidar, view_features


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
