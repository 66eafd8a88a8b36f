"""Label-free rank scores of representations: RankMe and LiDAR.

RankMe (Garrido et al., 2023): the exponential of the entropy of the normalised singular values
of the (N, D) feature matrix. LiDAR (Thilak et al., 2024): the same smooth rank of the LDA matrix
``Sw^{-1/2} Sb Sw^{-1/2}`` where each image is a surrogate class and its augmented views are
the class samples.

    python -m ijepa_toolkit.eval.rank --fname rank/digits [section.key=value ...]   # ijepa-rank

From Python: ``rank(encoder, folder)`` (an encoder object) or ``rankme(feats)`` / ``lidar(views)``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import numpy as np

from ..config import EncoderSection, LoggingSection, MetaSection
from ..engine.utils import autocast
from ..errors import UserError
from .features import LAYERS, EvalDataSection, FeaturesSection, encode_folder
from .frozen import cache_settings, finish_run, protocol_main, split_features, start_run

if TYPE_CHECKING:  # torch, torchvision and the model code are imported when a run starts
    import torch
    from torchvision import transforms

logger = logging.getLogger("ijepa_toolkit")


def smooth_rank(values: torch.Tensor, eps: float) -> float:
    """``exp(-sum p log p)`` with ``p = v / ||v||_1 + eps`` for non-negative spectrum ``v``."""
    import torch

    p = values / values.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def rankme(feats: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of (N, D) features; between 1 and min(N, D). Computed in float64."""
    import torch

    if feats.ndim != 2:
        raise ValueError(f"rankme expects (N, D) features, got shape {tuple(feats.shape)}")
    s = torch.linalg.svdvals(feats.double())
    return smooth_rank(s, eps)


def lidar(feats: torch.Tensor, delta: float = 1e-4, eps: float = 1e-8) -> float:
    """LiDAR of (n, q, D) features: n surrogate classes (images) with q augmented views each.

    Between-class scatter of the class means and within-class scatter (plus ``delta * I``) give
    the LDA matrix, whose eigenvalues enter the smooth rank. Computed in float64.
    """
    return smooth_rank(lda_eigenvalues(feats, delta), eps)


def lda_eigenvalues(feats: torch.Tensor, delta: float) -> torch.Tensor:
    """(D,) non-negative float64 eigenvalues of LiDAR's LDA matrix of (n, q, D) features."""
    import torch

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
    return torch.linalg.eigvalsh(lda).clamp_min(0)


def view_features(
    encoder: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    num_views: int,
    pool: str = "avg",
    device: Optional[torch.device] = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """(n, num_views, D) pooled features of ``num_views`` draws of each image ``dataset[i]``,
    ``i`` in ``indices`` (n of them): the input of ``lidar`` when ``dataset`` augments randomly.
    Unreadable images (``None`` items) are left out."""
    import torch

    with torch.inference_mode():
        return _view_features(encoder, dataset, indices, num_views, pool, device, batch_size)


def _view_features(encoder, dataset, indices, num_views, pool, device, batch_size):
    """``view_features``'s work (under ``torch.inference_mode``)."""
    import torch

    from ..models.heads import pooled_features

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
        raise UserError("view_features: none of the images could be read")
    return torch.stack(out)


def lidar_transform(data: EvalDataSection) -> transforms.Compose:
    """The augmentation whose views LiDAR scores: RandomResizedCrop (scale 0.3-1, bicubic),
    horizontal flip, ``data``'s normalisation."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(data.img_size, scale=(0.3, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.mean, data.std),
    ])  # fmt: skip


def capped(key: str, requested: int, available: int, warnings: list[str]) -> int:
    """``min(requested, available)``; appends (and logs) a warning to ``warnings`` when capped."""
    if requested > available:
        warnings.append(f"{key}={requested} but only {available} images: using {available}")
        logger.warning(warnings[-1])
    return min(requested, available)


def lidar_of_folder(
    encoder: torch.nn.Module,
    folder: str,
    data: EvalDataSection,
    images: int,
    views: int,
    delta: float,
    layers: str,
    rng: np.random.Generator,
    device: Optional[torch.device] = None,
    warnings: Optional[list[str]] = None,
) -> tuple[float, int]:
    """(LiDAR, number of images scored) of ``views`` augmented views (``lidar_transform``) of
    ``images`` images drawn from ``folder`` with ``rng`` (all of them, with a warning appended to
    ``warnings``, where the folder has fewer; unreadable images are left out)."""
    from ..data.folder import SafeImageFolder

    dataset = SafeImageFolder(folder, transform=lidar_transform(data))
    n = capped("rank.lidar_images", images, len(dataset), [] if warnings is None else warnings)
    feats = view_features(encoder, dataset, rng.permutation(len(dataset))[:n], views,
                          LAYERS[layers], device)  # fmt: skip
    return lidar(feats, delta=delta), int(feats.shape[0])


def rank(
    encoder: torch.nn.Module,
    folder: str,
    rankme_images: int = 25600,
    lidar_images: int = 1000,
    lidar_views: int = 50,
    lidar_delta: float = 1e-4,
    layers: str = "last",
    seed: int = 0,
    **data_options: Any,
) -> dict[str, float]:
    """``{"rankme", "lidar"}`` of ``encoder`` on the images of ``folder`` (no cache; LiDAR is
    skipped when ``lidar_images`` is 0); ``data_options``: ``EvalDataSection`` fields."""
    import torch

    data = EvalDataSection(**data_options)
    feats = encode_folder(encoder, folder, data, layers).feats
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(feats))[: min(len(feats), rankme_images)])
    metrics = {"rankme": rankme(torch.from_numpy(np.asarray(feats[rows])))}
    if lidar_images > 0:
        torch.manual_seed(seed)
        metrics["lidar"] = lidar_of_folder(encoder, folder, data, lidar_images, lidar_views,
                                           lidar_delta, layers, rng)[0]  # fmt: skip
    return metrics


@dataclass
class RankSection:
    split: Literal["train", "val"] = "val"  # the folder whose features are scored
    rankme_images: int = 25600  # at most this many images (seeded draw) for RankMe
    lidar_images: int = 1000  # surrogate classes for LiDAR (0: skip LiDAR)
    lidar_views: int = 50  # augmented views per image
    lidar_delta: float = 1e-4  # ridge on the within-class scatter


@dataclass
class RankConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: EvalDataSection = dataclasses.field(default_factory=EvalDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    rank: RankSection = dataclasses.field(default_factory=RankSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def run(cfg: RankConfig) -> Optional[dict[str, float]]:
    """RankMe of the cached features of ``rank.split`` and LiDAR of augmented views; writes the
    run folder and returns the metrics (main rank; None on the others)."""
    r, d = cfg.rank, cfg.data
    folder = d.train_folder if r.split == "train" else d.val_folder
    settings = {
        "split": r.split, "rankme_images": r.rankme_images, "layers": cfg.features.layers,
        "lidar_images": r.lidar_images, "lidar_views": r.lidar_views, "lidar_delta": r.lidar_delta,
        "lidar_augmentation": "RandomResizedCrop(scale 0.3-1) bicubic + flip",
    }  # fmt: skip
    dist_info = start_run(cfg, "rank", settings, folders=(f"{r.split}_folder",))
    import torch  # (after the cheap checks of start_run)

    from ..build import build_encoder

    feats = split_features(cfg, folder, dist_info)
    if not dist_info.is_main:
        return None
    rng, warnings = np.random.default_rng(cfg.meta.seed), []
    n = len(feats.labels)
    rows = np.sort(rng.permutation(n)[: capped("rank.rankme_images", r.rankme_images, n, warnings)])
    metrics = {"rankme": rankme(torch.from_numpy(np.array(feats.feats[rows])))}
    if r.lidar_images > 0:
        torch.manual_seed(cfg.meta.seed)
        encoder = build_encoder(cfg.model)
        metrics["lidar"], settings["n_lidar"] = lidar_of_folder(
            encoder, folder, d, r.lidar_images, r.lidar_views, r.lidar_delta, cfg.features.layers,
            rng, dist_info.device, warnings,
        )  # fmt: skip
    settings.update(n_rankme=len(rows), feature_dim=int(feats.feats.shape[1]), warnings=warnings,
                    **cache_settings((r.split, feats)))  # fmt: skip
    finish_run(cfg, dist_info, "rank", metrics, settings)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.eval.rank --fname rank/digits [key=value ...]``."""
    return protocol_main(RankConfig, __doc__, lambda cfg, args: run(cfg), argv)


if __name__ == "__main__":
    raise SystemExit(main())
