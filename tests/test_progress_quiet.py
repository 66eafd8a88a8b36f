"""Quiet by default, loud when it matters: cyanure's warnings and C-level banner become one
logged line per sweep; ``finetune.sh`` with a bad config is one error line (no torchrun
``ChildFailedError``); a failing run started elsewhere leaves no ``config.yaml`` behind."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ijepa_toolkit.data.synthetic_depth import write_synthetic_nyu
from ijepa_toolkit.eval.depth import main as depth_main
from ijepa_toolkit.eval.logistic import LogisticSection, logistic_features

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def log_text():
    stream = io.StringIO()
    log = logging.getLogger("ijepa_toolkit")
    log.addHandler(logging.StreamHandler(stream))
    log.setLevel(logging.INFO)
    return stream.getvalue


def test_a_logistic_sweep_logs_one_line_counting_cyanures_warnings(capfd, log_text):
    pytest.importorskip("cyanure")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 20)).astype(np.float32), rng.integers(0, 3, 200)
    opt = LogisticSection(lambd=[1e-8, 1e-6], preprocess="standardize", max_iter=300, tol=1e-6)
    metrics, selection = logistic_features(x, y, x[:40], y[:40], opt)
    assert set(selection["held_out_top1"]) == {1e-8, 1e-6} and 0 <= metrics["top1"] <= 100
    out, err = capfd.readouterr()
    assert "instability" not in out + err and "ConvergenceWarning" not in out + err
    summary = [ln for ln in log_text().splitlines() if "solver warning" in ln]
    assert len(summary) == 1, log_text()
    counts = {m[2]: int(m[1]) for m in re.finditer(r"(\d+)x (\w+):", summary[0])}
    total = int(re.search(r": (\d+) solver warning", summary[0])[1])
    assert counts.get("CyanureNotice", 0) >= 1 and sum(counts.values()) == total
    assert "numerical instability" in summary[0]


def test_finetune_sh_with_a_bad_config_is_one_error_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(REPO / "finetune.sh"), "finetune/tiny_cpu", "optimization.epochs=-1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: optimization.epochs must be >= 1, got -1 (config file: "
        f"{REPO / 'src/ijepa_toolkit/configs/finetune/tiny_cpu.yaml'})"
    ]
    assert list(tmp_path.iterdir()) == []  # no run folder either


def test_a_depth_run_with_a_missing_checkpoint_leaves_no_config_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # started from another directory: relative paths miss
    write_synthetic_nyu("runs/data/synthetic_depth", 4, 2)
    assert depth_main(["--fname", "depth/tiny_synthetic", "model.checkpoint=ckpt/missing.pth"]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert list(tmp_path.glob("runs/depth/**/config.yaml")) == []
