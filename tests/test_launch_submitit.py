"""``ijepa-submit`` through submitit's local executor (CPU, gloo): a 2-task finetuning job runs end
to end, and a 2-task job preempted mid-run (SIGUSR2 to every task, as SLURM sends it) is requeued
with ``--resume`` and ends with the weights of the uninterrupted job."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from ijepa_toolkit.configs import find_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.errors import UserError
from ijepa_toolkit.launch import Job, Resources, main, submit

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tasks inherit it


def run_args(out: Path, data: Path) -> list:
    """The tiny finetuning config on 100 digits, a checkpoint every 2 steps."""
    train, val = build_digits_imagefolder(data, size=32, per_class=10)
    return [
        "--fname", str(find_config("finetune/tiny_cpu")), f"data.train_folder={train}",
        f"data.val_folder={val}", "data.digits_root=null", f"logging.folder={out}",
        "logging.tensorboard=false", "optimization.epochs=2", "data.batch_size=8",
        "finetune.checkpoint_every=2", f"model.checkpoint={REPO}/tests/fixtures/"
        "ijepa_vit_p8_d64.pth.tar",
    ]  # fmt: skip


def local_job(tmp: Path, name: str):
    res = Resources(tasks_per_node=2, timeout_min=5)
    return submit("finetune", run_args(tmp / name, tmp / "d"), str(tmp / f"{name}_slurm"), res,
                  local=True)  # fmt: skip


def task_pids(controller: int) -> list:
    """The task processes the local controller started (its children)."""
    text = Path(f"/proc/{controller}/task/{controller}/children").read_text()
    return [int(p) for p in text.split()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    job = local_job(tmp, "run")
    statuses = job.results()  # raises if a task failed
    return tmp / "run", job, statuses


def test_two_task_job_runs_end_to_end(straight):
    out, job, statuses = straight
    assert statuses == [0, 0]
    results = json.loads((out / "results.json").read_text())
    # 2 ranks of 8 images a step: a global batch of 16 (one process would take 75 // 8 steps)
    assert results["steps"] == results["train_images"] // 16 * 2
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 2
    log = job.stdout()
    assert "exit status" not in log and "Requeued" not in log


def test_preempted_job_is_requeued_with_resume_and_ends_with_the_same_weights(tmp_path, straight):
    out = tmp_path / "run"
    job = local_job(tmp_path, "run")
    deadline = time.time() + TIMEOUT
    while not (out / "checkpoint-last.pth").exists():
        assert job.state != "FINISHED" and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.01)
    stopped_at = torch.load(out / "checkpoint-last.pth", weights_only=True)["step"]
    for pid in task_pids(job._process.pid):
        os.kill(pid, signal.SIGUSR2)  # SLURM's preemption / time-limit warning
    assert job.results() == [0, 0]
    log = job.stdout()
    assert "Requeued job" in log and "resumed from" in job.stderr()
    a = torch.load(straight[0] / "checkpoint-last.pth", weights_only=True)
    b = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert 0 < stopped_at < a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra = json.loads((straight[0] / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]


def test_checkpoint_adds_resume_once_and_only_where_it_exists():
    job = Job("finetune", ["--fname", "x"])
    again = job.checkpoint().function
    assert again.argv == ["--fname", "x", "--resume"] and job.preempted
    assert again.checkpoint().function.argv == ["--fname", "x", "--resume"]
    assert Job("knn", ["--fname", "x"]).checkpoint().function.argv == ["--fname", "x"]
    with pytest.raises(UserError, match="unknown entrypoint 'train'"):
        Job("train", [])


def test_bad_launch_requests_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["knn", "--folder", str(tmp_path), "--", "--fname", "knn/digits"]) == 2
    assert "sbatch not found" in capsys.readouterr().err
    assert main(["knn", "--local", "--nodes", "2", "--folder", str(tmp_path)]) == 2
    assert "--nodes must be 1" in capsys.readouterr().err
