"""The demo's table and the loss-curve picture, on results and logs written here."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ijepa_toolkit.demo import ROWS, table
from ijepa_toolkit.engine.logger import RunLogger
from ijepa_toolkit.viz import curve


def write(root, row, encoder, metrics):
    folder = root / row.folder / encoder
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"protocol": "x", "metrics": metrics}))


def test_table_bolds_the_better_encoder_per_row(tmp_path):
    knn, depth = ROWS[0], ROWS[-1]
    write(tmp_path, knn, "pretrained", {"top1@k20": 71.784})
    write(tmp_path, knn, "random_init", {"top1@k20": 56.0})
    write(tmp_path, depth, "pretrained", {"rmse": 0.9})
    write(tmp_path, depth, "random_init", {"rmse": 0.7})
    lines = table(tmp_path).splitlines()
    assert lines[2] == f"| {knn.label} | top-1 % | **71.78** | 56.00 |"
    assert lines[-1] == f"| {depth.label} | RMSE m | 0.90 | **0.70** |"  # lower is better
    assert lines[3].endswith("| — | — |")  # no results yet: dashes, nothing bold


def test_curve_png_draws_the_logged_values(tmp_path):
    log = RunLogger(tmp_path / "run", tensorboard=False)
    for step in range(20):
        log.log(step, loss=1.0 / (step + 1))
    log.log(20, knn=5.0)  # rows without the key are skipped
    log.close()
    out = curve([str(tmp_path / "run" / "log.jsonl"), "loss", str(tmp_path / "loss.png")])
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] >= 500 and img.shape[1] >= 800
    blue = (img[..., 2] > 150) & (img[..., 0] < 140) & (img[..., 1] < 190)
    assert blue.sum() > 100  # the curve is drawn
    cols = np.flatnonzero(blue[:, : img.shape[1] * 3 // 4].any(axis=0))  # (left of the legend)
    assert cols.min() < 0.15 * img.shape[1] and cols.max() > 0.6 * img.shape[1]  # spans the axes
