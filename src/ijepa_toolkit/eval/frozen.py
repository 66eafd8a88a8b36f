"""Shared plumbing of the frozen-feature protocols (knn, logistic, linear, rank): the command
line, run setup, cached features and ``results.json``.

Each protocol module is ``<Protocol>Config`` + a Python function on objects + ``run(cfg)`` +
``main(argv) -> int``; ``protocol_main`` is that ``main``. torch and the model code are imported
when a run starts (``--help`` and config errors answer without them).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from ..config import config_parser, parse_config, require_paths, save_config
from ..data.subsets import SubsetSection, subset_of
from ..engine.distributed import DistInfo, cleanup, init_distributed
from ..engine.logger import RunLogger, setup_console_logging
from ..errors import ConfigError
from ..runs import run_main, write_results
from .features import (
    EvalDataSection,
    FeatureSet,
    build_eval_dataset,
    device_decode_dataset,
    encode_folder,
    load_or_extract,
    model_identity,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ijepa_toolkit")


def protocol_main(
    config_cls: type,
    doc: str,
    run: Callable[[Any, argparse.Namespace], Any],
    argv: Optional[Sequence[str]] = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> int:
    """Parse ``--fname NAME_OR_PATH [flags] key=value ...`` into ``config_cls`` and call
    ``run(cfg, args)`` under ``runs.run_main``; returns the exit status (``--help``: 0, a bad
    config or input: 2 with one ``error:`` line)."""
    parser = config_parser(doc)
    add_arguments(parser)

    def work() -> None:
        cfg, args = parse_config(config_cls, parser, argv)
        run(cfg, args)

    try:
        return run_main(work, cleanup)
    except SystemExit as e:  # argparse (--help, a bad flag) and parse_config's own exit
        return e.code if isinstance(e.code, int) else 2


def held_out_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: ``fraction`` of each class held out (at least one per class with
    two or more images), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def start_run(
    cfg: Any, protocol: str, settings: dict, folders: Sequence[str] = ("train_folder", "val_folder")
) -> DistInfo:
    """Checks that the image ``folders`` (``data.<key>``) and the checkpoint exist (before any
    model is built), then the process group, console logging and the resolved ``config.yaml``;
    logs the protocol settings."""
    paths = [(f"data.{key}", getattr(cfg.data, key), "folder") for key in folders]
    if cfg.model.checkpoint:
        if not Path(cfg.model.checkpoint).is_file():  # a release / timm name, a transformers
            from ..formats import locate  # folder -> its file (formats import torch: only here)

            found = locate(cfg.model.checkpoint)
            if found != Path(cfg.model.checkpoint):
                cfg.model.checkpoint = str(found)
        paths.append(("model.checkpoint", cfg.model.checkpoint, "file"))
    require_paths(paths)
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
    from ..data.folder import SafeImageFolder

    return subset_of(SafeImageFolder(folder), subset)


def split_features(
    cfg: Any, folder: str, dist_info: DistInfo, indices: Optional[Sequence[int]] = None
) -> FeatureSet:
    """Cached features of ``folder`` (restricted to ``indices``) for the config's encoder;
    ``features.gpu_decode``: the JPEGs are decoded and resized on the GPU (CUDA only)."""
    dataset = build_eval_dataset(folder, cfg.data, indices)
    if cfg.features.gpu_decode:
        if dist_info.device.type != "cuda":
            raise ConfigError(
                f"features.gpu_decode=true decodes JPEGs on the GPU, but the device is "
                f"{dist_info.device} (meta.device={cfg.meta.device}): set features.gpu_decode=false"
            )
        dataset = device_decode_dataset(dataset, cfg.data)
    identity = model_identity(cfg.model, cfg.meta.seed, cfg.features.cache_dir, dist_info.is_main)

    def make_encoder() -> torch.nn.Module:
        import torch

        from ..build import build_encoder

        torch.manual_seed(cfg.meta.seed)  # a random init depends on the seed only
        return build_encoder(cfg.model)

    return load_or_extract(
        dataset, identity, make_encoder, cfg.features.layers, cfg.features.cache_dir, dist_info,
        cfg.data.batch_size, cfg.data.num_workers, cfg.meta.use_bfloat16,
        verify=cfg.features.verify, hash_images=cfg.features.hash_images,
        compile=cfg.features.compile,
    )  # fmt: skip


def check_same_classes(train: FeatureSet, test: FeatureSet) -> None:
    if train.classes != test.classes:
        raise ConfigError(
            f"data.train_folder and data.val_folder have different classes "
            f"({len(train.classes)} vs {len(test.classes)}: {train.classes[:3]}... vs "
            f"{test.classes[:3]}...)"
        )


def encode_folders(
    encoder: torch.nn.Module, train_folder: str, val_folder: str, layers: str, data_options: dict
) -> tuple[FeatureSet, FeatureSet]:
    """Features of the two image folders (no cache) under the evaluation transform of
    ``data_options`` (``EvalDataSection`` fields), their classes checked equal."""
    data = EvalDataSection(**data_options)
    train = encode_folder(encoder, train_folder, data, layers)
    test = encode_folder(encoder, val_folder, data, layers)
    check_same_classes(train, test)
    return train, test


def cache_settings(*splits: tuple[str, FeatureSet]) -> dict:
    """``feature_cache`` (the cache folder) and ``cache_reused`` per split, for the settings."""
    return {
        "feature_cache": str(splits[0][1].path.parent),
        "cache_reused": {name: fs.reused for name, fs in splits},
    }


def finish_run(cfg: Any, dist_info: DistInfo, protocol: str, metrics: dict, settings: dict) -> None:
    """``results.json`` and a ``log.jsonl`` row (main rank), the metrics on the console."""
    if not dist_info.is_main:
        return
    run_log = RunLogger(cfg.logging.folder, tensorboard=cfg.logging.tensorboard)
    run_log.log(step=0, **{f"{protocol}/{k}": v for k, v in metrics.items()})
    run_log.close()
    write_results(
        cfg.logging.folder, protocol, metrics, encoder_checkpoint=cfg.model.checkpoint,
        which=cfg.model.which, settings=settings,
    )  # fmt: skip
    print(f"{protocol} ({cfg.features.layers}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))  # fmt: skip
