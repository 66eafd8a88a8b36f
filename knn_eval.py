"""Weighted kNN on frozen features (DINOv2 protocol): L2-normalised features, cosine similarity,
top-k neighbours weighted ``exp(sim / T)``, top-1 and top-5 for each k.

    python knn_eval.py --fname configs/knn/digits.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 knn_eval.py --fname ...   # bank sharded across ranks
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ijepa_toolkit.config import (
    EncoderSection,
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
    require,
)
from ijepa_toolkit.eval.features import EvalDataSection, FeaturesSection
from ijepa_toolkit.eval.frozen import (
    check_same_classes,
    finish_run,
    run_cli,
    split_features,
    start_run,
)
from ijepa_toolkit.eval.knn import DEFAULT_KS, knn_scores, topk_accuracy


@dataclass
class KNNSection:
    ks: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_KS))
    temperature: float = 0.07
    chunk_size: int = 1024  # test rows per similarity block: memory chunk_size x N_train/rank


@dataclass
class KNNConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: EvalDataSection = dataclasses.field(default_factory=EvalDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    knn: KNNSection = dataclasses.field(default_factory=KNNSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def run(cfg: KNNConfig) -> None:
    k = cfg.knn
    require([
        ("knn.ks", k.ks, bool(k.ks) and all(i >= 1 for i in k.ks), "a non-empty list of ints >= 1"),
        ("knn.temperature", k.temperature, k.temperature > 0, "> 0"),
        ("knn.chunk_size", k.chunk_size, k.chunk_size >= 1, ">= 1"),
    ])  # fmt: skip
    settings = {
        "normalize": "l2", "similarity": "cosine", "weights": "exp(sim/T)",
        "temperature": cfg.knn.temperature, "ks": cfg.knn.ks, "layers": cfg.features.layers,
        "transform": f"resize {round(cfg.data.img_size / cfg.data.crop_ratio)} bicubic, "
        f"center crop {cfg.data.img_size}, mean {cfg.data.mean}, std {cfg.data.std}",
    }  # fmt: skip
    dist_info = start_run(cfg, "knn", settings)
    train = split_features(cfg, cfg.data.train_folder, dist_info)
    test = split_features(cfg, cfg.data.val_folder, dist_info)
    check_same_classes(train, test)
    shard = slice(dist_info.rank, None, dist_info.world_size)  # this rank's part of the bank
    device = dist_info.device
    scores = knn_scores(
        torch.from_numpy(np.array(train.feats[shard])).to(device),
        torch.from_numpy(np.array(train.labels[shard])).to(device),
        torch.from_numpy(np.array(test.feats)), len(train.classes), ks=cfg.knn.ks,
        temperature=cfg.knn.temperature, chunk_size=cfg.knn.chunk_size, sharded=True,
    )  # fmt: skip
    test_labels = torch.from_numpy(test.labels)
    metrics = {}
    for k, s in scores.items():
        acc = topk_accuracy(s, test_labels, (1, 5))
        metrics[f"top1@k{k}"], metrics[f"top5@k{k}"] = acc[1], acc[5]
    settings.update(n_train=len(train.labels), n_test=len(test.labels),
                    world_size=dist_info.world_size, feature_cache=str(train.path.parent),
                    cache_reused={"train": train.reused, "test": test.reused})  # fmt: skip
    finish_run(cfg, dist_info, "knn", metrics, settings)


def main(argv=None) -> None:
    cfg, _ = parse_config(KNNConfig, config_parser(__doc__), argv)
    run_cli(lambda: run(cfg))


if __name__ == "__main__":
    main()
