"""Tiny pretraining runs for tests: config overrides, launching main_pretrain.py, kill/resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ijepa_toolkit.io.read import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "src/ijepa_toolkit/configs/pretrain/tiny_cpu.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def tiny_overrides(digits: tuple[Path, Path], folder: Path, **extra) -> list[str]:
    """``key=value`` overrides: a width-32, depth-2 encoder, 3 epochs, logging into ``folder``."""
    train, val = digits
    opts = {
        "data.train_folder": str(train), "data.digits_root": "null",
        "data.batch_size": 16, "data.knn_train_folder": str(train),
        "data.knn_val_folder": str(val), "model.arch": "{embed_dim: 32, depth: 2, num_heads: 4}",
        "model.pred_depth": 1, "model.pred_emb_dim": 16, "optimization.epochs": 3,
        "logging.folder": str(folder), "logging.log_freq": 1, "logging.rankme_freq": 3,
        "logging.knn_freq": 0, "logging.tensorboard": False, **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in opts.items()]


def launch(args: list[str], nproc: int = 1, **kw) -> subprocess.Popen:
    """``main_pretrain.py --fname tiny_cpu.yaml *args``, under torchrun when ``nproc > 1``."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(REPO / "main_pretrain.py"), "--fname", str(CONFIG), *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for a launched run; it must succeed. Returns its output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def tensors(obj, prefix=""):
    """(dotted name, tensor) for every tensor in nested dicts / lists."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}.{i}")


def killed_and_resumed(args: list[str], folder: Path, epochs: int) -> tuple[dict, str]:
    """SIGKILL a run as soon as its first checkpoint exists, then ``--resume`` it to the end.

    Returns the checkpoint the kill left behind and the resumed run's output.
    """
    proc = launch(args)
    ckpt = folder / "checkpoint-last.pth"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "results.json").exists(), "run finished before the kill"
    saved = read_checkpoint(ckpt)
    assert saved["epoch"] < epochs
    out = finish(launch([*args, "--resume"]))
    assert "resumed from" in out
    return saved, out


def assert_same_state(whole: Path, resumed: Path, names: tuple[str, ...]) -> None:
    """The two runs' final checkpoints hold equal tensors under ``names`` and equal counters."""
    a = read_checkpoint(whole / "checkpoint-last.pth")
    b = read_checkpoint(resumed / "checkpoint-last.pth")
    ta, tb = dict(tensors({k: a[k] for k in names})), dict(tensors({k: b[k] for k in names}))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert (a["epoch"], a["step"], a["loss"]) == (b["epoch"], b["step"], b["loss"])
