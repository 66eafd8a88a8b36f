"""SIGKILL at random iterations, then ``--resume``: the same weights, metrics and log as an
uninterrupted run; the log is only appended to, and its rows read back (``read_jsonl``: the
resumed run's rows supersede the killed attempt's after its checkpoint) hold each step once."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ijepa_toolkit.configs import find_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.logger import RunLogger, read_jsonl

from .common import REPO, TIMEOUT, env


def kill_after_rows(cmd: list, log: Path, rows: int) -> None:
    """Run ``cmd`` and SIGKILL it once ``log`` holds at least ``rows`` lines."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT
    while not log.exists() or log.read_bytes().count(b"\n") < rows:
        assert proc.poll() is None, f"the run ended before {rows} log rows"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def assert_resumed_run_equals_straight(
    straight: Path, killed: Path, model_key: str, timings: tuple = ()
) -> None:
    """Same counters, weights, metrics and log rows (but the ``timings`` keys) in both runs."""
    a = torch.load(straight / "checkpoint-last.pth", weights_only=True)
    b = torch.load(killed / "checkpoint-last.pth", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for k, v in a[model_key].items():
        assert torch.equal(v, b[model_key][k]), k
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]
    rows_a, rows_b = (
        [{k: v for k, v in r.items() if k not in timings} for r in read_jsonl(run / "log.jsonl")]
        for run in (straight, killed)
    )
    assert len(rows_b) == len(rows_a), "a row was lost or logged twice"
    assert rows_b == rows_a


def test_depth_probe_killed_twice_at_random_iterations_resumes_exactly(tmp_path, depth_scenes):
    cmd = [sys.executable, str(REPO / "depth_eval.py"), "--fname",
           str(find_config("depth/tiny_synthetic")), f"data.train_folder={depth_scenes}",
           "logging.tensorboard=false", "logging.log_freq=1", "optimization.epochs=3",
           "eval.visualisations=0", "eval.every=1"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*cmd, f"logging.folder={straight}"], env=env(), check=True, timeout=TIMEOUT,
                   capture_output=True)  # fmt: skip
    total = len((straight / "log.jsonl").read_text().splitlines())  # 4 steps/epoch: 12 + 4 rows
    rng = random.Random()
    first = rng.randint(2, total // 2)
    second = rng.randint(first + 1, total - 2)
    log = killed / "log.jsonl"
    kill_after_rows([*cmd, f"logging.folder={killed}"], log, first)
    before = log.read_bytes()
    kill_after_rows([*cmd, f"logging.folder={killed}", "--resume"], log, second)
    assert log.read_bytes().startswith(before), "the log was truncated"
    before = log.read_bytes()
    subprocess.run([*cmd, f"logging.folder={killed}", "--resume"], env=env(), check=True,
                   timeout=TIMEOUT, capture_output=True)  # fmt: skip
    assert log.read_bytes().startswith(before), "the log was truncated"
    assert_resumed_run_equals_straight(straight, killed, "model")


def test_row_cut_by_a_kill_is_skipped_and_the_log_goes_on(tmp_path, caplog):
    log = RunLogger(tmp_path, tensorboard=False)
    log.log(1, loss=0.5)
    log.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # SIGKILL in the middle of a row
    log = RunLogger(tmp_path, tensorboard=False)
    log.resumed_at(0)  # resumed from scratch: step 1 is logged again
    log.log(1, loss=0.5)
    log.log(1, epoch=1)
    log.log(2, loss=0.25)
    log.close()
    assert read_jsonl(tmp_path / "log.jsonl") == [
        {"step": 1, "loss": 0.5}, {"step": 1, "epoch": 1}, {"step": 2, "loss": 0.25}
    ]  # fmt: skip
    assert "line 2 is a partial row" in caplog.text


def test_linear_probe_killed_at_a_random_epoch_resumes_exactly(tmp_path):

    train, val = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=30)
    cmd = [sys.executable, str(REPO / "main_linprobe.py"), "--fname",
           str(find_config("linprobe/digits")), f"data.train_folder={train}",
           f"data.val_folder={val}", "meta.device=cpu", f"model.checkpoint={REPO}/tests/"
           "fixtures/ijepa_vit_p8_d64.pth.tar", f"features.cache_dir={tmp_path / 'cache'}",
           "logging.tensorboard=false", "optimization.epochs=40", "optimization.batch_size=32",
           "optimization.warmup_epochs=3"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*cmd, f"logging.folder={straight}"], env=env(), check=True, timeout=TIMEOUT,
                   capture_output=True)  # fmt: skip
    log = killed / "log.jsonl"
    kill_after_rows([*cmd, f"logging.folder={killed}"], log, random.randint(1, 20))
    assert not (killed / "results.json").exists()
    before = log.read_bytes()
    subprocess.run([*cmd, f"logging.folder={killed}", "--resume"], env=env(), check=True,
                   timeout=TIMEOUT, capture_output=True)  # fmt: skip
    assert log.read_bytes().startswith(before), "the log was truncated"
    assert_resumed_run_equals_straight(straight, killed, "model")


def test_pretraining_killed_at_a_random_step_resumes_with_an_exact_log(tmp_path):
    train, _ = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=8)
    overrides = {
        "data.train_folder": str(train), "data.digits_root": "null",
        "data.batch_size": 16, "model.arch": "{embed_dim: 32, depth: 2, num_heads: 4}",
        "model.pred_depth": 1, "model.pred_emb_dim": 16, "optimization.epochs": 2,
        "logging.log_freq": 1, "logging.rankme_freq": 4, "logging.knn_freq": 0,
        "logging.tensorboard": False,
    }  # fmt: skip
    cmd = [sys.executable, str(REPO / "main_pretrain.py"), "--fname",
           str(find_config("pretrain/tiny_cpu")),
           *[f"{k}={v}" for k, v in overrides.items()]]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*cmd, f"logging.folder={straight}"], env=env(), check=True, timeout=TIMEOUT,
                   capture_output=True)  # fmt: skip
    total = len((straight / "log.jsonl").read_text().splitlines())
    log = killed / "log.jsonl"
    kill_after_rows([*cmd, f"logging.folder={killed}"], log, random.randint(2, total - 2))
    before = log.read_bytes()
    resumed = subprocess.run([*cmd, f"logging.folder={killed}", "--resume"], env=env(),
                             timeout=TIMEOUT, capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log.read_bytes().startswith(before), "the log was truncated"
    assert_resumed_run_equals_straight(straight, killed, "encoder", timings=("epoch_seconds",))
