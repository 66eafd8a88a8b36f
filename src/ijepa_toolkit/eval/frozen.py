"""Shared plumbing of the frozen-feature entrypoints: run setup, cached features, results."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from ..build import build_encoder
from ..config import save_config
from ..data.folder import SafeImageFolder
from ..data.subsets import SubsetSection, subset_of
from ..engine.distributed import DistInfo, cleanup, init_distributed
from ..engine.logger import RunLogger, setup_console_logging, write_results
from .features import FeatureSet, build_eval_dataset, load_or_extract, model_identity

logger = logging.getLogger("ijepa_toolkit")


def start_run(cfg: Any, protocol: str, settings: dict) -> DistInfo:
    """Process group, console logging, resolved ``config.yaml``; logs the protocol settings."""
    dist_info = init_distributed(cfg.meta.device)
    setup_console_logging(dist_info.is_main)
    if dist_info.is_main:
        save_config(cfg, cfg.logging.folder)
    logger.info("protocol %s: %s", protocol, json.dumps(settings, sort_keys=True))
    return dist_info


def subset_indices(folder: str, subset: SubsetSection) -> Optional[list[int]]:
    """Indices into the ImageFolder ``folder`` of ``subset``; None for the whole folder."""
    if not subset.file and subset.per_class <= 0:
        return None
    if not folder:
        raise ValueError("image folder not set: give data.train_folder")
    return subset_of(SafeImageFolder(folder), subset)


def split_features(
    cfg: Any, folder: str, dist_info: DistInfo, indices: Optional[Sequence[int]] = None
) -> FeatureSet:
    """Cached features of ``folder`` (restricted to ``indices``) for the config's encoder."""
    dataset = build_eval_dataset(folder, cfg.data, indices)
    identity = model_identity(cfg.model, cfg.meta.seed, cfg.features.cache_dir, dist_info.is_main)

    def make_encoder() -> torch.nn.Module:
        torch.manual_seed(cfg.meta.seed)  # a random init depends on the seed only
        return build_encoder(cfg.model)

    return load_or_extract(
        dataset, identity, make_encoder, cfg.features.layers, cfg.features.cache_dir, dist_info,
        cfg.data.batch_size, cfg.data.num_workers, cfg.meta.use_bfloat16,
    )  # fmt: skip


def check_same_classes(train: FeatureSet, test: FeatureSet) -> None:
    if train.classes != test.classes:
        raise ValueError(
            f"train and test folders have different classes ({len(train.classes)} vs "
            f"{len(test.classes)}: {train.classes[:3]}... vs {test.classes[:3]}...)"
        )


def finish_run(cfg: Any, dist_info: DistInfo, protocol: str, metrics: dict, settings: dict) -> None:
    """``results.json`` and a ``log.jsonl`` row (main rank), the metrics on the console."""
    if dist_info.is_main:
        run_log = RunLogger(cfg.logging.folder, tensorboard=cfg.logging.tensorboard)
        run_log.log(step=0, **{f"{protocol}/{k}": v for k, v in metrics.items()})
        run_log.close()
        write_results(
            cfg.logging.folder, protocol, metrics, checkpoint=cfg.model.checkpoint,
            which=cfg.model.which if cfg.model.checkpoint else "random_init",
            features=cfg.features.layers, settings=settings,
        )  # fmt: skip
        print(f"{protocol} ({cfg.features.layers}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))  # fmt: skip


def run_cli(run: Callable[[], None]) -> None:
    """Run an entrypoint; bad input (files, subsets, checkpoints, values) is one ``error:`` line."""
    try:
        run()
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        cleanup()
