"""Depth maps holding NaN / +inf / -inf: those pixels are invalid ground truth, exactly like
missing (zero) depth; a map with no valid pixel is skipped and counted, never averaged in."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ijepa_toolkit.configs import find_config
from ijepa_toolkit.eval.depth import main

BAD = (np.nan, np.inf, -np.inf)


def write_shards(scenes: Path, out: Path, bad: bool) -> Path:
    """The synthetic scenes as tar shards (``.jpg`` + ``.depth.npy`` in metres); a third of every
    map's rows are NaN / inf (``bad``) or 0 (missing depth), and the first test map is all bad."""
    out.mkdir(parents=True)
    for split in ("train", "test"):
        with tarfile.open(out / f"{split}-000.tar", "w") as tf:
            for i, line in enumerate((scenes / f"nyu_{split}.txt").read_text().splitlines()):
                rgb, dep, _ = line.split()
                with Image.open(scenes / dep) as im:
                    depth = np.asarray(im, dtype=np.float32) / 1000.0
                rows = slice(None) if split == "test" and i == 0 else slice(i % 3, None, 3)
                depth[rows] = BAD[i % 3] if bad else 0.0
                buf = io.BytesIO()
                np.save(buf, depth)
                for name, data in ((f"{i:04d}.jpg", (scenes / rgb).read_bytes()),
                                   (f"{i:04d}.depth.npy", buf.getvalue())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return out


def test_nan_and_inf_depth_pixels_are_invalid_like_missing_depth(tmp_path, depth_scenes):
    results = {}
    for bad in (True, False):
        shards = write_shards(depth_scenes, tmp_path / f"shards_{bad}", bad)
        out = tmp_path / f"run_{bad}"
        main(["--fname", str(find_config("depth/tiny_synthetic")), "data.format=tar",
              f"data.train_folder={shards}", "data.train_split=train-*.tar",
              "data.test_split=test-*.tar", f"logging.folder={out}", "optimization.epochs=2",
              "logging.tensorboard=false", "eval.visualisations=1"])  # fmt: skip
        results[bad] = json.loads((out / "results.json").read_text())
        results[bad]["head"] = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    nan, zero = results[True], results[False]
    assert all(math.isfinite(v) for v in nan["metrics"].values()), nan["metrics"]
    assert nan["skipped_invalid"] == 1 and nan["skipped_names"] == ["test-000.tar:0000"]
    assert nan["images"] == zero["images"] == 7
    assert nan["metrics"] == zero["metrics"]
    for k, v in zero["head"].items():
        assert torch.equal(nan["head"][k], v), k
