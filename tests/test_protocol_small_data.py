"""Small data (issue 15.9): a linear probe with one step per epoch, diverged heads and LiDAR
asked for more images than exist are warned about, recorded, and a diverged head is never
selected."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_toolkit.errors import TrainingDiverged
from ijepa_toolkit.eval import rank as rank_eval
from ijepa_toolkit.eval.features import FeatureSet
from ijepa_toolkit.eval.linear import OptimizationSection, linear_features, select_and_test
from ijepa_toolkit.eval.linear_heads import diverged_heads, make_heads

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ijepa_vit_p8_d64.pth.tar"


def separable(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return (np.eye(3)[y] * 4 + 0.1 * rng.normal(size=(n, 3))).astype(np.float32), y


def test_a_diverged_head_is_never_selected_even_on_a_held_out_tie():
    x, y = separable(30)
    heads = make_heads(3, 3, 2, batchnorm=False)
    heads[0] = copy.deepcopy(heads[1])  # identical heads: a held-out tie goes to head 0 ...
    grid = [(5e37, 0.0), (0.1, 0.0)]
    data = FeatureSet(x, y, [])
    rows = np.arange(30)
    metrics, sel = select_and_test(heads, grid, data, rows, data, [True, False])  # ... diverged
    assert sel["lr_selected"] == 0.1 and sel["diverged_heads"] == ["lr5e+37_wd0"]
    assert diverged_heads(heads, [float("inf"), 1.0]) == [True, False]
    with torch.no_grad():
        heads[1].linear.weight[0, 0] = float("nan")
    assert diverged_heads(heads, None) == [False, True]
    with pytest.raises(TrainingDiverged, match="every head diverged"):
        select_and_test(heads, grid, data, rows, data, [True, True])


def test_one_step_per_epoch_and_a_diverging_lr_are_warned_and_recorded():
    x, y = separable(40)
    y[::5] = (y[::5] + 1) % 3  # label noise: the huge lr then overflows to inf / NaN
    x_te, y_te = separable(30, seed=1)
    opt = OptimizationSection(optimizer="sgd", base_lrs=[3e37, 0.5], batch_size=256, epochs=5,
                              warmup_epochs=0)  # fmt: skip
    metrics, sel = linear_features(x, y, x_te, y_te, opt, batchnorm=False, held_out_fraction=0.25)
    assert sel["steps_per_epoch"] == 1 and sel["lr_selected"] == 0.5
    assert sel["diverged_heads"] == [f"lr{3e37:g}_wd0"]
    assert "1 step(s) per epoch" in sel["warnings"][0] and "diverged" in sel["warnings"][1]
    assert metrics["top1"] == 100.0


def test_lidar_asked_for_more_images_than_exist_is_recorded(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / c / f"{i}.png")
    argv = [f"data.val_folder={tmp_path / 'val'}", "data.img_size=32", "data.crop_ratio=1.0",
            "data.num_workers=0", f"model.checkpoint={FIXTURE}", "model.num_heads=4",
            f"features.cache_dir={tmp_path / 'cache'}", f"logging.folder={tmp_path / 'run'}",
            "logging.tensorboard=false", "rank.lidar_images=50", "rank.lidar_views=2",
            "rank.rankme_images=100"]  # fmt: skip
    assert rank_eval.main(argv) == 0
    settings = json.loads((tmp_path / "run" / "results.json").read_text())["settings"]
    assert settings["n_lidar"] == 6 and settings["n_rankme"] == 6
    assert any("rank.lidar_images=50" in w for w in settings["warnings"])
    assert any("rank.rankme_images=100" in w for w in settings["warnings"])
