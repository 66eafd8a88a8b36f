"""Issue 14, failures 5 and 7: run folders owned by one run, and epoch metrics that survive a
mid-epoch resume.

Each test failed before the change: two finetunes into one folder both ran (no lock); a rerun
without ``--resume`` was refused only for a checkpoint (no ``--overwrite``); a pretraining
``--resume`` with another lr exited 0 and emptied ``results.json``'s metrics; a linear-probe
``--resume`` with another lr grid resumed; the demo and the tables reused any ``results.json``;
a resumed attempt's rows duplicated a killed attempt's steps; the epoch ``train_loss`` after a
mid-epoch resume averaged only the steps after it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ijepa_toolkit import demo
from ijepa_toolkit.configs import find_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.logger import RunLogger, read_jsonl
from ijepa_toolkit.eval import linear
from ijepa_toolkit.finetune import engine as finetune_engine
from ijepa_toolkit.finetune import run as finetune
from ijepa_toolkit.pretrain import train as pretrain
from ijepa_toolkit.run_folder import resolved_config
from ijepa_toolkit.runs import write_results
from ijepa_toolkit.tables import main as tables_main

from .common import REPO, TIMEOUT, env

FIXTURE = str(REPO / "tests/fixtures/ijepa_vit_p8_d64.pth.tar")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=8)


def finetune_args(digits, folder, *extra: str) -> list[str]:
    train, val = digits
    return ["--fname", str(find_config("finetune/tiny_cpu")), f"data.train_folder={train}",
            f"data.val_folder={val}", "data.digits_root=null", f"model.checkpoint={FIXTURE}",
            "data.batch_size=8", "optimization.epochs=1", "optimization.warmup_epochs=0",
            "logging.log_freq=1", "logging.tensorboard=false", f"logging.folder={folder}",
            *extra]  # fmt: skip


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(digits, tmp_path, capsys):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ijepa_toolkit.run_folder import "
         f"lock_folder; lock_folder({str(folder)!r}); print('held', flush=True); time.sleep(60)"],
        env=env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert finetune.main(finetune_args(digits, folder)) == 2
        assert last_error(capsys) == (
            f"error: {folder} is in use by another run (pid {holder.pid}): wait for it to end, "
            "or use another logging.folder"
        )
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT)
    assert finetune.main(finetune_args(digits, folder)) == 0  # the lock died with its holder


def test_a_new_run_into_a_used_folder_is_refused_and_overwrite_replaces_it(
    digits, tmp_path, capsys
):
    folder = tmp_path / "run"
    assert finetune.main(finetune_args(digits, folder)) == 0
    names = ("checkpoint-last.pth", "checkpoint-best.pth", "results.json", "log.jsonl")
    before = {name: (folder / name).read_bytes() for name in names}
    assert finetune.main(finetune_args(digits, folder, "optimization.lr=0.01")) == 2
    assert last_error(capsys) == (
        f"error: {folder} holds the outputs of another run (checkpoint-last.pth, "
        "checkpoint-best.pth, results.json, log.jsonl): pass --resume to continue it, "
        "--overwrite to replace it, or use a new logging.folder"
    )
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert finetune.main(finetune_args(digits, folder, "optimization.lr=0.01", "--overwrite")) == 0
    steps = [r["step"] for r in read_jsonl(folder / "log.jsonl", raw=True) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, not two
    assert yaml.safe_load((folder / "config.yaml").read_text())["optimization"]["lr"] == 0.01


def tiny_pretrain(digits, folder, **extra) -> list[str]:
    opts = {"data.train_folder": str(digits[0]), "data.digits_root": "null", "data.batch_size": 16,
            "model.arch": "{embed_dim: 32, depth: 2, num_heads: 4}", "model.pred_depth": 1,
            "model.pred_emb_dim": 16, "optimization.epochs": 1, "logging.folder": str(folder),
            "logging.log_freq": 1, "logging.rankme_freq": 0, "logging.knn_freq": 0,
            "logging.tensorboard": False, **extra}  # fmt: skip
    return [
        "--fname",
        str(find_config("pretrain/tiny_cpu")),
        *[f"{k}={v}" for k, v in opts.items()],
    ]


def test_pretraining_resume_refuses_changed_settings_and_keeps_finished_results(
    digits, tmp_path, capsys
):
    folder = tmp_path / "pre"
    assert pretrain.main(tiny_pretrain(digits, folder)) == 0
    config, results = (folder / "config.yaml").read_text(), (folder / "results.json").read_text()
    changed = tiny_pretrain(digits, folder, **{"optimization.lr": 0.01, "model.loss": "l2"})
    assert pretrain.main([*changed, "--resume"]) == 2
    assert last_error(capsys) == (
        f"error: --resume: model.loss 'smooth_l1' -> 'l2', optimization.lr 0.001 -> 0.01 differ "
        f"from {folder / 'config.yaml'}, and they change what the run computes: resume with the "
        "saved values, or start a new logging.folder (or --overwrite)"
    )
    assert (folder / "config.yaml").read_text() == config
    assert (folder / "results.json").read_text() == results
    assert pretrain.main([*tiny_pretrain(digits, folder), "--resume"]) == 0  # finished: no-op
    assert (
        json.loads((folder / "results.json").read_text())["metrics"]
        == (json.loads(results)["metrics"])
    )
    longer = tiny_pretrain(digits, folder, **{"optimization.epochs": 2, "logging.log_freq": 2})
    assert pretrain.main([*longer, "--resume"]) == 0  # allowed: more epochs, another log_freq
    marks = [r for r in read_jsonl(folder / "log.jsonl", raw=True) if "resumed_at" in r]
    assert marks[-1]["config_changes"] == {"logging.log_freq": [1, 2],
                                           "optimization.epochs": [1, 2]}  # fmt: skip
    epochs = [r["epoch"] for r in read_jsonl(folder / "log.jsonl") if "epoch_loss" in r]
    assert epochs == [1, 2]


def test_a_run_saved_before_a_key_existed_resumes_at_that_keys_default(digits, tmp_path, capsys):
    """A key added to the toolkit after a run started is absent from its ``config.yaml``: at its
    default the run resumes (defaults keep what the older code computed); set otherwise, it is
    refused like any changed setting."""
    folder = tmp_path / "pre"
    assert pretrain.main(tiny_pretrain(digits, folder)) == 0
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    del saved["model"]["qk_norm"], saved["optimization"]["betas"]  # as an older version wrote it
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    set_key = tiny_pretrain(digits, folder, **{"model.qk_norm": "layernorm"})
    assert pretrain.main([*set_key, "--resume"]) == 2
    assert "model.qk_norm '(absent)' -> 'layernorm' differ from" in last_error(capsys)
    longer = tiny_pretrain(digits, folder, **{"optimization.epochs": 2})
    assert pretrain.main([*longer, "--resume"]) == 0
    marks = [r for r in read_jsonl(folder / "log.jsonl", raw=True) if "resumed_at" in r]
    assert marks[-1]["config_changes"] == {"optimization.epochs": [1, 2]}


def test_linear_probe_resume_with_another_lr_grid_is_refused(digits, tmp_path, capsys):
    train, val = digits
    args = ["--fname", "linprobe/digits", f"data.train_folder={train}", f"data.val_folder={val}",
            "meta.device=cpu", f"model.checkpoint={FIXTURE}", "logging.tensorboard=false",
            f"features.cache_dir={tmp_path / 'cache'}", f"logging.folder={tmp_path / 'lp'}",
            "optimization.epochs=2", "optimization.warmup_epochs=0",
            "optimization.batch_size=32"]  # fmt: skip
    assert linear.main(args) == 0
    assert linear.main([*args, "optimization.base_lrs=[2.0, 20.0, 200.0]", "--resume"]) == 2
    assert last_error(capsys).startswith(
        "error: --resume: optimization.base_lrs [1.0, 10.0, 100.0] -> [2.0, 20.0, 200.0] differ"
    )


def finished_run(folder, module: str, args: list, protocol: str, metrics: dict) -> None:
    """What a finished run of ``python -m module args`` leaves: config.yaml, results.json."""
    config = resolved_config(module, args)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_results(folder, protocol, metrics, encoder_checkpoint=config["model"]["checkpoint"],
                  which="target_encoder")  # fmt: skip


def test_demo_reruns_a_result_made_from_another_encoder(digits, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run", lambda module, *args: calls.append(args))
    folder, train = tmp_path / "knn", digits[0]
    base = ["--fname", "demo/knn", f"data.train_folder={train}", f"data.val_folder={digits[1]}",
            f"logging.folder={folder}"]  # fmt: skip
    finished_run(folder, "ijepa_toolkit.eval.knn", [*base, f"model.checkpoint={FIXTURE}"],
                 "knn", {"top1@k20": 50.0})  # fmt: skip
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # the thread count the demo pins
    demo.step("ijepa_toolkit.eval.knn", [*base, f"model.checkpoint={FIXTURE}"], folder, env)
    assert calls == []  # same encoder, config and data: reused
    demo.step("ijepa_toolkit.eval.knn", [*base, "model.checkpoint=null"], folder, env)
    assert calls == [(*base, "model.checkpoint=null")]  # the random-init row is not reused


def test_tables_refuse_a_result_whose_encoder_file_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"weights v1")
    (tmp_path / "t.yaml").write_text(
        "title: t\ncolumns: [{name: top-1, key: metrics.top1}]\nrows:\n"
        f"  - {{name: a, protocol: logistic, config: logistic/digits, checkpoint: {ckpt}}}\n"
    )
    folder = Path("runs/tables/t/a")  # the table's default run folder, under the cwd
    args = ["--fname", "logistic/digits", f"model.checkpoint={ckpt}", f"logging.folder={folder}"]
    finished_run(folder, "ijepa_toolkit.eval.logistic", args, "logistic", {"top1": 80.0})
    assert tables_main(["--fname", "t.yaml", "--collect"]) == 0
    ckpt.write_bytes(b"weights v2, retrained")
    assert tables_main(["--fname", "t.yaml", "--collect"]) == 2
    assert last_error(capsys) == (
        f"error: row 'a': {folder / 'results.json'}: it was made from another encoder checkpoint"
        f" (or the file changed); delete {folder} to run the row again, or point the row's "
        "folder elsewhere"
    )


def test_log_rows_of_a_killed_attempt_are_superseded_by_the_resumed_run(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):  # checkpoint at step 3, killed after logging step 5
        log.log(step, loss=1.0 / step)
    log.close()
    before = (tmp_path / "log.jsonl").read_bytes()
    log = RunLogger(tmp_path, tensorboard=False)
    log.resumed_at(3)
    for step in range(4, 7):  # the resumed run (another trajectory, e.g. a nondeterministic GPU)
        log.log(step, loss=2.0 / step)
    log.log(6, epoch=1)  # an epoch row at the same step: other keys, kept
    log.close()
    assert (tmp_path / "log.jsonl").read_bytes().startswith(before)  # append-only
    rows = read_jsonl(tmp_path / "log.jsonl")
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                    {"step": 3, "loss": 1.0 / 3}, {"step": 4, "loss": 0.5},
                    {"step": 5, "loss": 0.4}, {"step": 6, "loss": 1.0 / 3},
                    {"step": 6, "epoch": 1}]  # fmt: skip


def test_epoch_train_loss_after_a_mid_epoch_resume_equals_the_uninterrupted_run(
    digits, tmp_path, monkeypatch
):
    extra = ("finetune.checkpoint_every=3",)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert finetune.main(finetune_args(digits, straight, *extra)) == 0
    step = finetune_engine._optimizer_step
    taken = []

    def interrupted_at_step_5(*args, **kwargs):
        if len(taken) == 4:
            raise KeyboardInterrupt
        taken.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(finetune_engine, "_optimizer_step", interrupted_at_step_5)
    assert finetune.main(finetune_args(digits, killed, *extra)) == 130
    assert torch.load(killed / "checkpoint-last.pth", weights_only=True)["step"] == 3
    monkeypatch.setattr(finetune_engine, "_optimizer_step", step)
    assert finetune.main([*finetune_args(digits, killed, *extra), "--resume"]) == 0
    a, b = (
        [r for r in read_jsonl(run / "log.jsonl") if "train_loss" in r]
        for run in (straight, killed)
    )
    assert len(a) == len(b) == 1
    assert b[0]["train_loss"] == a[0]["train_loss"]
    assert read_jsonl(killed / "log.jsonl") == read_jsonl(straight / "log.jsonl")
