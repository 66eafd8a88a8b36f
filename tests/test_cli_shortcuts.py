"""What users of DINO, DINOv2 and MAE type: ``--pretrained-weights`` / ``--output-dir`` /
``--data-path``, one value for a list key (``knn.ks=10``), a config path without ``--fname``;
and Ctrl-C: one line, exit 130, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ijepa_toolkit.config import config_parser, load_config, parse_config
from ijepa_toolkit.errors import ConfigError
from ijepa_toolkit.eval.knn import KNNConfig
from ijepa_toolkit.eval.knn import main as knn_main
from ijepa_toolkit.pretrain.train import PretrainConfig

REPO = Path(__file__).resolve().parents[1]


def parsed(cls, *argv: str):
    return parse_config(cls, config_parser("test"), ["--fname", "knn/digits", *argv])[0]


def test_one_value_for_a_list_key_is_a_one_item_list(tmp_path):
    assert load_config(KNNConfig, "knn/digits", ["knn.ks=10"]).knn.ks == [10]
    (tmp_path / "c.yaml").write_text("knn:\n  ks: 20\n")
    assert load_config(KNNConfig, tmp_path / "c.yaml").knn.ks == [20]
    with pytest.raises(ConfigError, match=r"knn.ks\[0\] must be int, got 'ten'"):
        load_config(KNNConfig, "knn/digits", ["knn.ks=ten"])


@pytest.mark.parametrize("dash", ["-", "_"])
def test_dino_and_mae_path_flags_set_the_config_keys(dash):
    cfg = parsed(KNNConfig, f"--pretrained{dash}weights", "w/vit.pth", f"--output{dash}dir",
                 "out/knn", f"--data{dash}path", "/data/in1k")  # fmt: skip
    assert cfg.model.checkpoint == "w/vit.pth" and cfg.logging.folder == "out/knn"
    assert (cfg.data.train_folder, cfg.data.val_folder) == ("/data/in1k/train", "/data/in1k/val")


def test_an_explicit_key_wins_over_a_shortcut():
    cfg = parsed(KNNConfig, "--output-dir", "out/a", "logging.folder=out/b", "--data-path", "/d",
                 "data.val_folder=/v")  # fmt: skip
    assert cfg.logging.folder == "out/b"
    assert (cfg.data.train_folder, cfg.data.val_folder) == ("/d/train", "/v")


def test_a_shortcut_sets_only_the_keys_the_entrypoint_has(capsys):
    argv = ["--fname", "pretrain/tiny_cpu", "data.digits_root=", "--data-path", "/d"]
    cfg = parse_config(PretrainConfig, config_parser("test"), argv)[0]
    assert cfg.data.train_folder == "/d/train"  # pretraining reads no val folder
    with pytest.raises(SystemExit) as e:
        parse_config(PretrainConfig, config_parser("test"), [*argv, "--pretrained-weights", "w"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --pretrained-weights: this entrypoint's config has no "
                          "model.checkpoint")  # fmt: skip


def test_a_positional_config_path_answers_did_you_mean_fname(capsys):
    assert knn_main(["knn/digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: override 'knn/digits' is not of the form key.sub=value; "
                   "did you mean --fname knn/digits?"]  # fmt: skip


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ijepa_toolkit.pretrain.train", "--fname", "pretrain/tiny_cpu",
           f"logging.folder={tmp_path / 'run'}", "logging.tensorboard=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it started
        lines.append(proc.stderr.readline())
        if " INFO " in lines[-1] or not lines[-1]:  # run_main is running: building the model
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1:] == ["interrupted"]
    assert [ln for ln in rest.splitlines() if " INFO " not in ln] == ["interrupted"]
