"""depth_eval.py end to end on rendered scenes with known depth: trains, beats the mean, resumes;
a diverging loss is one line naming the last good checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_toolkit.configs import CONFIG_DIR
from ijepa_toolkit.data.synthetic_depth import write_synthetic_nyu
from ijepa_toolkit.engine.logger import read_jsonl
from ijepa_toolkit.eval import depth
from ijepa_toolkit.eval.depth import main

CONFIG = str(CONFIG_DIR / "depth" / "tiny_synthetic.yaml")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """96 train / 24 test rendered scenes, plus one test frame whose depth is all invalid."""
    root = write_synthetic_nyu(tmp_path_factory.mktemp("syn") / "nyu", 96, 24, 48, 64, seed=1)
    Image.fromarray(np.zeros((48, 64), dtype=np.uint16)).save(root / "test" / "no_depth.png")
    first_rgb = (root / "nyu_test.txt").read_text().split()[0]
    with open(root / "nyu_test.txt", "a") as f:
        f.write(f"{first_rgb} test/no_depth.png 51.2\n")
    return root


def read_depth(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        return np.asarray(im, dtype=np.float64) / 1000.0


def mean_depth_baseline_rmse(root: Path) -> float:
    """RMSE of predicting the training set's mean valid depth, per image on the Eigen crop."""
    train = [ln.split()[1] for ln in (root / "nyu_train.txt").read_text().splitlines()]
    values = np.concatenate(
        [d[(d > 1e-3) & (d < 10)] for d in (read_depth(root, p) for p in train)]
    )
    mean = values.mean()
    rmses = []
    for line in (root / "nyu_test.txt").read_text().splitlines():
        gt = read_depth(root, line.split()[1])[5:47, 4:60]  # Eigen crop of 48x64, by hand
        valid = (gt > 1e-3) & (gt < 10)
        if valid.any():
            rmses.append(math.sqrt(((gt[valid] - mean) ** 2).mean()))
    return float(np.mean(rmses))


def test_probe_trains_end_to_end_and_beats_the_mean_depth(scenes, tmp_path):
    out = tmp_path / "run"
    assert main(["--fname", CONFIG, f"data.train_folder={scenes}", f"logging.folder={out}",
                 "logging.tensorboard=false"]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "depth" and res["encoder_checkpoint"] is None
    assert res["which"] == "random_init"
    assert res["output_checkpoint"] == str(out / "checkpoint-last.pth")
    assert set(res["metrics"]) == {"d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log",
                                   "log10", "silog"}  # fmt: skip
    assert all(math.isfinite(v) for v in res["metrics"].values())
    assert res["images"] == 24 and res["skipped_invalid"] == 1
    assert res["skipped_names"] == ["test/scene_0000/rgb_00000.jpg"]
    baseline = mean_depth_baseline_rmse(scenes)
    assert res["metrics"]["rmse"] < 0.9 * baseline, (res["metrics"]["rmse"], baseline)
    s = res["settings"]
    assert s["eval_crop"].startswith("rows 45:471, cols 41:601 of 480x640")
    assert s["valid_depth"] == "0.001 < gt < 10.0 m" and s["flip_tta"] is False
    assert s["features"]["blocks"] == [0, 1, 2, 3]
    rows = read_jsonl(out / "log.jsonl")
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (out / "config.yaml").is_file() and (out / "checkpoint-last.pth").is_file()
    panels = sorted((out / "visualisations").glob("*.png"))
    assert len(panels) == 3
    with Image.open(panels[0]) as im:
        assert im.width >= 800 and im.height >= 500  # input | gt | prediction + colour bar


def test_resume_after_a_crash_ends_with_the_same_head(scenes, tmp_path, monkeypatch):
    common = ["--fname", CONFIG, f"data.train_folder={scenes}", "probe.head=bins",
              "eval.flip_tta=true", "optimization.epochs=2", "optimization.batch_size=32",
              "logging.tensorboard=false", "eval.visualisations=0"]  # fmt: skip
    assert main([*common, f"logging.folder={tmp_path / 'straight'}"]) == 0

    real_epoch, calls = depth.train_one_epoch, []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(depth, "train_one_epoch", crash_in_second_epoch)
    assert main([*common, f"logging.folder={tmp_path / 'cut'}"]) == 130  # interrupted
    monkeypatch.setattr(depth, "train_one_epoch", real_epoch)
    assert torch.load(tmp_path / "cut" / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    assert main([*common, f"logging.folder={tmp_path / 'cut'}", "--resume"]) == 0

    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint-last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"] and ra["settings"]["flip_tta"] is True


def test_bad_input_is_one_error_line(scenes, tmp_path, capsys):
    split = tmp_path / "nyu_test.txt"
    lines = (scenes / "nyu_test.txt").read_text().splitlines()
    split.write_text("\n".join([*lines[:2], "test/gone.jpg test/gone.png 51.2"]) + "\n")
    status = main(["--fname", CONFIG, f"data.train_folder={scenes}", f"data.test_split={split}",
                   f"logging.folder={tmp_path / 'r'}"])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "2 listed file(s) missing, e.g. line 3:" in err
    assert main(["--fname", CONFIG, f"data.train_folder={scenes}", "probe.blocks=[0, 1, 2, 9]",
                 f"logging.folder={tmp_path / 'r'}"]) == 2  # fmt: skip
    assert "probe.blocks=[0, 1, 2, 9]" in capsys.readouterr().err
    assert main(["--fname", CONFIG, "data.crop_size=[40]", f"logging.folder={tmp_path / 'r'}"]) == 2
    assert "error: data.crop_size=[40]: expected [height, width]" in capsys.readouterr().err
    for key, value in (("eval.crop", "garg"), ("loss.silog_lambda", "2"), ("eval.batch_size", "0"),
                       ("data.train_folder", str(tmp_path / "nowhere"))):  # fmt: skip
        # refused before training, not at the evaluation after
        assert main(["--fname", CONFIG, f"data.train_folder={scenes}", f"{key}={value}",
                     f"logging.folder={tmp_path / 'early'}"]) == 2  # fmt: skip
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and key in last and value in last, last
        assert not (tmp_path / "early" / "log.jsonl").exists()


def test_nan_loss_is_one_error_line_naming_the_last_good_checkpoint(scenes, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--fname", CONFIG, f"data.train_folder={scenes}", f"logging.folder={out}",
              "logging.tensorboard=false", "eval.visualisations=0"]  # fmt: skip
    assert main([*common, "optimization.epochs=1"]) == 0
    good = torch.load(out / "checkpoint-last.pth", weights_only=True)
    # resumed with an absurd lr: epoch 2's first update blows the head up, its next loss is nan
    # (a resume refuses another lr when it can compare: the saved config is removed)
    (out / "config.yaml").unlink()
    assert main([*common, "optimization.epochs=3", "optimization.lr=1e30",
                 "optimization.warmup_epochs=0", "--resume"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss is nan at step ")
    assert not any("Traceback" in e for e in err)
    assert err[-1].endswith(f"; stopping before the update (last good checkpoint: "
                            f"{out / 'checkpoint-last.pth'})")  # fmt: skip
    after = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert after["epoch"] == 1 and all(torch.equal(v, after["model"][k])
                                       for k, v in good["model"].items())  # fmt: skip
