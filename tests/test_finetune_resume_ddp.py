"""Exact resume after SIGKILL; 2-process DDP (gloo, CPU) and gradient accumulation against one
process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ijepa_toolkit.configs import find_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.logger import read_jsonl
from ijepa_toolkit.finetune.run import main

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), e.get("PYTHONPATH", "")])
    return e


def run_args(out: Path, data: Path, *extra: str) -> list:
    """``main_finetuning.py`` arguments: the tiny config on 100 digits, logging every step."""
    train, val = build_digits_imagefolder(data, size=32, per_class=10)
    return [
        "--fname", str(find_config("finetune/tiny_cpu")), f"data.train_folder={train}",
        f"data.val_folder={val}", "data.digits_root=null", f"logging.folder={out}",
        "logging.log_freq=1", "logging.tensorboard=false", f"model.checkpoint={REPO}/"
        "tests/fixtures/ijepa_vit_p8_d64.pth.tar", *extra,
    ]  # fmt: skip


def command(out: Path, data: Path, *extra: str) -> list:
    return [sys.executable, str(REPO / "main_finetuning.py"), *run_args(out, data, *extra)]


def final_state(out: Path) -> dict:
    return torch.load(out / "checkpoint-last.pth", weights_only=True)


def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    # The full recipe (RandAugment, erasing, Mixup, drop path): every random stream must resume.
    extra = (
        "optimization.epochs=2", "data.batch_size=8", "finetune.checkpoint_every=2",
        "data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25", "mixup.mixup=0.8",
        "mixup.cutmix=1.0", "finetune.drop_path=0.1", "finetune.model_ema=true",
        "finetune.model_ema_decay=0.9",
    )  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight, tmp_path / "d", *extra), env=env(), check=True,
                   timeout=TIMEOUT, capture_output=True)  # fmt: skip
    proc = subprocess.Popen(command(killed, tmp_path / "d", *extra), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + TIMEOUT
    while not (killed / "checkpoint-last.pth").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    stopped_at = final_state(killed)
    total = final_state(straight)["step"]
    assert stopped_at["step"] < total and not (killed / "results.json").exists()
    subprocess.run(command(killed, tmp_path / "d", *extra, "--resume"), env=env(), check=True,
                   timeout=TIMEOUT, capture_output=True)  # fmt: skip
    a, b = final_state(straight), final_state(killed)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, total)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["model_ema"][k], b["model_ema"][k]), k
    assert not torch.equal(a["model_ema"]["head.linear.weight"], a["model"]["head.linear.weight"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]


def test_ddp_and_accumulation_match_one_process_and_every_val_image_counts_once(tmp_path):
    # Same global batch (2 x 8 vs 1 x 16), no random augmentation: the same loss curve.
    extra = ("optimization.epochs=2", "data.augment=false", "mixup.mixup=0", "mixup.cutmix=0",
             "finetune.drop_path=0.0")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(command(one, tmp_path / "d", *extra, "data.batch_size=16"), env=env(),
                   check=True, timeout=TIMEOUT, capture_output=True)  # fmt: skip
    # finetune.sh CONFIG NPROC [overrides]: torchrun, 2 processes, gloo
    args = run_args(two, tmp_path / "d", *extra, "data.batch_size=8")
    subprocess.run([str(REPO / "finetune.sh"), args[1], "2", *args[2:]],
                   env=dict(env(), PYTHON=sys.executable), check=True, timeout=TIMEOUT,
                   capture_output=True)  # fmt: skip
    accum = tmp_path / "accum"  # 2 accumulated micro-batches of 8: the same steps again
    assert main(run_args(accum, tmp_path / "d", *extra, "data.batch_size=8",
                         "optimization.accum_iter=2")) == 0  # fmt: skip
    curves = [[r["loss"] for r in read_jsonl(run / "log.jsonl") if "loss" in r]
              for run in (one, two, accum)]  # fmt: skip
    assert len(curves[0]) == len(curves[1]) == len(curves[2]) > 4
    for curve in curves[1:]:
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(curves[0]), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
    res_one = json.loads((one / "results.json").read_text())
    res_two = json.loads((two / "results.json").read_text())
    n_val = sum(1 for _ in (tmp_path / "d" / "val").glob("*/*.png"))
    assert n_val % 2 == 1  # an odd count: padding or a dropped tail would show
    assert res_one["val_images"] == res_two["val_images"] == n_val
    torch.testing.assert_close(res_two["metrics"]["top1"], res_one["metrics"]["top1"])
