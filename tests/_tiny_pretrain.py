"""Overrides that shrink configs/pretrain/tiny_cpu.yaml to a seconds-long run on given digits."""

from __future__ import annotations

from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml"


def tiny_overrides(digits: tuple[Path, Path], folder: Path, **extra) -> list[str]:
    """``key=value`` overrides: a width-32, depth-2 encoder, 3 epochs, logging into ``folder``."""
    train, val = digits
    opts = {
        "data.dataset": "imagefolder", "data.root_path": str(train), "data.image_folder": "",
        "data.batch_size": 16, "data.knn_train_folder": str(train),
        "data.knn_val_folder": str(val), "model.arch": "{embed_dim: 32, depth: 2, num_heads: 4}",
        "model.pred_depth": 1, "model.pred_emb_dim": 16, "optimization.epochs": 3,
        "logging.folder": str(folder), "logging.log_freq": 1, "logging.rankme_freq": 3,
        "logging.knn_freq": 0, "logging.tensorboard": False, **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in opts.items()]
