"""Label-free rank scores of representations: RankMe and LiDAR.

RankMe (Garrido et al., 2023): the exponential of the entropy of the normalised singular values
of the (N, D) feature matrix. LiDAR (Thilak et al., 2024): the same smooth rank of the LDA matrix
``Sw^{-1/2} Sb Sw^{-1/2}`` where each image is a surrogate class and its augmented views are
the class samples.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..engine.utils import autocast
from ..models.heads import pooled_features


def smooth_rank(values: torch.Tensor, eps: float) -> float:
    """``exp(-sum p log p)`` with ``p = v / ||v||_1 + eps`` for non-negative spectrum ``v``."""
    p = values / values.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def rankme(feats: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of (N, D) features; between 1 and min(N, D). Computed in float64."""
    if feats.ndim != 2:
        raise ValueError(f"rankme expects (N, D) features, got shape {tuple(feats.shape)}")
    s = torch.linalg.svdvals(feats.double())
    return smooth_rank(s, eps)


def lidar(feats: torch.Tensor, delta: float = 1e-4, eps: float = 1e-8) -> float:
    """LiDAR of (n, q, D) features: n surrogate classes (images) with q augmented views each.

    Between-class scatter of the class means and within-class scatter (plus ``delta * I``) give
    the LDA matrix, whose eigenvalues enter the smooth rank. Computed in float64.
    """
    if feats.ndim != 3 or feats.shape[1] < 2:
        raise ValueError(f"lidar expects (n, q>=2, D) features, got shape {tuple(feats.shape)}")
    z = feats.double()
    n, q, d = z.shape
    class_means = z.mean(dim=1)  # (n, D)
    centred_means = class_means - class_means.mean(dim=0)
    between = centred_means.T @ centred_means / (n - 1)
    within_dev = (z - class_means[:, None]).reshape(n * q, d)
    within = within_dev.T @ within_dev / (n * (q - 1)) + delta * torch.eye(d, dtype=z.dtype)
    evals, evecs = torch.linalg.eigh(within)
    inv_sqrt = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
    lda = inv_sqrt @ between @ inv_sqrt
    return smooth_rank(torch.linalg.eigvalsh(lda).clamp_min(0), eps)


@torch.inference_mode()
def view_features(
    encoder: torch.nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    num_views: int,
    pool: str = "avg",
    device: Optional[torch.device] = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """(n, num_views, D) pooled features of ``num_views`` draws of each image ``dataset[i]``,
    ``i`` in ``indices`` (n of them): the input of ``lidar`` when ``dataset`` augments randomly.
    Unreadable images (``None`` items) are left out."""
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    out = []
    for i in indices:
        views = [dataset[int(i)] for _ in range(num_views)]
        if any(v is None for v in views):
            continue
        images = torch.stack([v[0] for v in views])
        feats = []
        for start in range(0, num_views, batch_size):
            with autocast(device):
                x = images[start : start + batch_size].to(device)
                feats.append(pooled_features(encoder, x, pool).float().cpu())
        out.append(torch.cat(feats))
    if not out:
        raise ValueError("view_features: none of the images could be read")
    return torch.stack(out)
