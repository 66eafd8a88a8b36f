"""Label-free rank scores of frozen features: RankMe (smooth rank of the (N, D) feature matrix,
from the feature cache) and LiDAR (smooth rank of the LDA matrix over augmented views).

    python rank_eval.py --fname configs/rank/digits.yaml [section.key=value ...]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import transforms

from ijepa_toolkit.build import build_encoder
from ijepa_toolkit.config import (
    EncoderSection,
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
)
from ijepa_toolkit.data.folder import SafeImageFolder
from ijepa_toolkit.eval.features import LAYERS, EvalDataSection, FeaturesSection
from ijepa_toolkit.eval.frozen import finish_run, run_cli, split_features, start_run
from ijepa_toolkit.eval.rank import lidar, rankme, view_features


@dataclass
class RankSection:
    split: str = "val"  # train | val: the folder whose features are scored
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


def run(cfg: RankConfig) -> None:
    r, d = cfg.rank, cfg.data
    if r.split not in ("train", "val"):
        raise ValueError(f"rank.split must be 'train' or 'val', got {r.split!r}")
    folder = d.train_folder if r.split == "train" else d.val_folder
    settings = {
        "split": r.split, "rankme_images": r.rankme_images, "layers": cfg.features.layers,
        "lidar_images": r.lidar_images, "lidar_views": r.lidar_views, "lidar_delta": r.lidar_delta,
        "lidar_augmentation": "RandomResizedCrop(scale 0.3-1) bicubic + flip",
    }  # fmt: skip
    dist_info = start_run(cfg, "rank", settings)
    feats = split_features(cfg, folder, dist_info)
    if not dist_info.is_main:
        return
    rng = np.random.default_rng(cfg.meta.seed)
    n = len(feats.labels)
    rows = np.sort(rng.permutation(n)[: min(n, r.rankme_images)])
    metrics = {"rankme": rankme(torch.from_numpy(np.array(feats.feats[rows])))}
    if r.lidar_images > 0:
        tf = transforms.Compose([
            transforms.RandomResizedCrop(d.img_size, scale=(0.3, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(d.mean, d.std),
        ])  # fmt: skip
        dataset = SafeImageFolder(folder, transform=tf)
        images = rng.permutation(len(dataset))[: min(len(dataset), r.lidar_images)]
        torch.manual_seed(cfg.meta.seed)
        encoder = build_encoder(cfg.model)
        views = view_features(encoder, dataset, images, r.lidar_views,
                              LAYERS[cfg.features.layers], dist_info.device)  # fmt: skip
        metrics["lidar"] = lidar(views, delta=r.lidar_delta)
    settings.update(n_rankme=len(rows), feature_dim=int(feats.feats.shape[1]),
                    feature_cache=str(feats.path.parent), cache_reused=feats.reused)  # fmt: skip
    finish_run(cfg, dist_info, "rank", metrics, settings)


def main(argv=None) -> None:
    cfg, _ = parse_config(RankConfig, config_parser(__doc__), argv)
    run_cli(lambda: run(cfg))


if __name__ == "__main__":
    main()
