"""A rank that dies under ``torchrun --nproc_per_node 2`` (gloo, CPU): the job exits non-zero in
bounded time (no hang in a collective), and rank 0's checkpoint is intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ijepa_toolkit.configs import find_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.io.read import read_checkpoint

from .common import REPO, TIMEOUT, env

BOUND = 60  # seconds from the death of a rank to the end of the job


def processes_with(marker: str, rank: int | None = None) -> list[int]:
    """Pids whose environment holds ``FAULT_RUN=marker`` (and ``RANK=rank`` when given)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FAULT_RUN={marker}".encode() in environ and (
            rank is None or f"RANK={rank}".encode() in environ
        ):
            found.append(int(pid))
    return found


def test_dead_rank_ends_the_job_non_zero_in_bounded_time(tmp_path):
    train, _ = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=16)
    out = tmp_path / "run"
    overrides = {
        "data.train_folder": str(train), "data.digits_root": "null",
        "data.batch_size": 8, "model.arch": "{embed_dim: 32, depth: 2, num_heads: 4}",
        "model.pred_depth": 1, "model.pred_emb_dim": 16, "optimization.epochs": 200,
        "logging.folder": str(out), "logging.log_freq": 1, "logging.rankme_freq": 0,
        "logging.knn_freq": 0, "logging.lidar_freq": 0, "logging.tensorboard": False,
    }  # fmt: skip
    marker = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "main_pretrain.py"), "--fname", str(find_config("pretrain/tiny_cpu")),
           *[f"{k}={v}" for k, v in overrides.items()]]  # fmt: skip
    job = subprocess.Popen(cmd, env={**env(), "FAULT_RUN": marker}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    ckpt = out / "checkpoint-last.pth"
    deadline = time.time() + TIMEOUT
    while not ckpt.exists():
        assert job.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.05)
    (victim,) = processes_with(marker, rank=1)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    output, _ = job.communicate(timeout=BOUND)
    assert job.returncode != 0, output[-2000:]
    took = time.time() - killed_at
    print(f"job ended {took:.1f} s after rank 1 died, exit status {job.returncode}")
    assert took < BOUND
    assert processes_with(marker) == [], "a worker outlived the job"
    obj = read_checkpoint(ckpt)  # old or new, never half: readable and complete
    assert obj["world_size"] == 2 and obj["epoch"] >= 1
    assert set(obj) >= {"encoder", "predictor", "target_encoder", "opt"}
