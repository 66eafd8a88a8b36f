"""main_pretrain.py end to end on a few digits: official checkpoint layout read back exactly,
NaN stop, exact resume after SIGKILL, 2-process DDP parity with one process."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from _tiny_pretrain import (
    CONFIG,
    assert_same_state,
    finish,
    killed_and_resumed,
    launch,
    tensors,
    tiny_overrides,
)

from ijepa_toolkit import load_encoder, load_predictor
from ijepa_toolkit.config import load_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.engine.logger import read_jsonl
from ijepa_toolkit.io.read import read_checkpoint
from ijepa_toolkit.models.vit import encode_masked
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer, main

OFFICIAL_KEYS = {"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss",
                 "batch_size", "world_size", "lr"}  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=16)


def _cfg(digits, folder, **extra) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIG, tiny_overrides(digits, folder, **extra))


def test_checkpoint_is_official_layout_and_loads_exactly(digits, tmp_path):
    extra = {"optimization.epochs": 1, "model.stop": True, "model.output_norm": "dyntanh",
             "logging.knn_freq": 1, "logging.lidar_freq": 1,
             "logging.lidar_images": 32}  # fmt: skip
    cfg = _cfg(digits, tmp_path, **extra)
    trainer = Pretrainer(cfg, DistInfo())
    metrics = trainer.run()
    trainer.log.close()
    assert 0 <= metrics["knn_top1"] <= 100 and 0 <= metrics["knn_top1_init"] <= 100
    assert 1 <= metrics["lidar"] <= 32
    rows = read_jsonl(tmp_path / "log.jsonl")
    monitored = {"loss", "lr", "wd", "momentum", "grad_norm", "target_std", "rankme"}
    assert monitored <= set().union(*rows), set().union(*rows)
    assert all(r["target_std"] > 0 and r["grad_norm"] > 0 for r in rows if "target_std" in r)
    obj = read_checkpoint(trainer.ckpt_path)
    assert OFFICIAL_KEYS <= set(obj) and obj["epoch"] == 1 and obj["world_size"] == 1
    for name in ("encoder", "predictor", "target_encoder"):
        assert all(k.startswith("module.") for k in obj[name])
    images = torch.randn(3, 3, 32, 32)
    ((_, masks_x, masks),) = trainer.sample_masks(3)
    with torch.no_grad():
        for which in ("target_encoder", "encoder"):
            loaded = load_encoder(trainer.ckpt_path, which=which, num_heads=4)
            live = getattr(trainer, which).eval()
            assert torch.equal(loaded.forward_features(images), live.forward_features(images))
        # StoP checkpoints hold the official keys only: the StoP forward is asked for by name
        pred = load_predictor(trainer.ckpt_path, num_heads=4, stop_sigma=cfg.model.stop_sigma)
        assert pred.stop_sigma == cfg.model.stop_sigma > 0
        ctx = encode_masked(trainer.encoder, images, masks_x)
        torch.manual_seed(7)
        expected = trainer.predictor.eval()(ctx, masks_x, masks)
        torch.manual_seed(7)
        assert torch.equal(pred(ctx, masks_x, masks), expected)


def test_nan_loss_is_one_error_line_and_keeps_last_good_checkpoint(digits, tmp_path, capsys):
    args = ["--fname", str(CONFIG),
            *tiny_overrides(digits, tmp_path, **{"optimization.epochs": 1,
                                                 "logging.rankme_freq": 0})]  # fmt: skip
    assert main(args) == 0
    before = read_checkpoint(tmp_path / "checkpoint-last.pth")
    # resumed with an lr that blows the weights up: a later loss is nan or inf (a resume refuses
    # another lr when it can compare: the saved config is removed)
    (tmp_path / "config.yaml").unlink()
    blow_up = ["optimization.epochs=3", "optimization.start_lr=1e38", "optimization.lr=1e38"]
    assert main([*args, *blow_up, "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert re.fullmatch(r"error: loss is (nan|inf) at step \d+ \(epoch 2\); stopping before the "
                        rf"update \(last good checkpoint: {re.escape(str(tmp_path))}/"
                        r"checkpoint-last.pth\)", err[-1]), err[-1]  # fmt: skip
    after = read_checkpoint(tmp_path / "checkpoint-last.pth")
    assert after["epoch"] == 1
    for (k, a), (_, b) in zip(tensors(before["target_encoder"]), tensors(after["target_encoder"])):
        assert torch.equal(a, b), k
    load_encoder(tmp_path / "checkpoint-last.pth", num_heads=4)  # finite, loadable


def test_exact_resume_after_sigkill(digits, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = {"optimization.epochs": 4, "model.target_norm": "running_batchnorm",
             "model.stop": True, "data.crop_scale": "[0.3, 1.0]"}  # fmt: skip
    finish(launch(tiny_overrides(digits, whole, **extra)))
    killed_and_resumed(tiny_overrides(digits, killed, **extra), killed, epochs=4)
    assert_same_state(
        whole, killed, ("encoder", "predictor", "target_encoder", "opt", "target_norm")
    )
    rows = [r for r in read_jsonl(whole / "log.jsonl") if "epoch_loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["epoch_loss"]) for r in rows)


def test_ddp_two_processes_match_one_process(digits, tmp_path):
    extra = {"optimization.epochs": 1, "model.target_norm": "batchnorm",
             "data.crop_scale": "[1.0, 1.0]"}  # fmt: skip
    one_process = {**extra, "data.batch_size": 16, "mask.group_size": 8}
    one = launch(tiny_overrides(digits, tmp_path / "one", **one_process))
    finish(one)
    two = launch(
        tiny_overrides(digits, tmp_path / "two", **{**extra, "data.batch_size": 8}), nproc=2
    )
    finish(two, timeout=180)
    a = read_checkpoint(tmp_path / "one" / "checkpoint-last.pth")
    b = read_checkpoint(tmp_path / "two" / "checkpoint-last.pth")
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["step"] == b["step"] > 0
    for name in ("encoder", "predictor", "target_encoder"):
        for k, v in a[name].items():
            assert torch.allclose(v, b[name][k], atol=2e-5, rtol=1e-4), (name, k)
    la = [r["loss"] for r in read_jsonl(tmp_path / "one" / "log.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "two" / "log.jsonl") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-4)


def test_resuming_a_folder_written_by_another_model_is_one_error_line(digits, tmp_path, capsys):
    import main_pretrain

    args = tiny_overrides(digits, tmp_path, **{"optimization.epochs": 1, "logging.rankme_freq": 0})
    assert main_pretrain.main(["--fname", str(CONFIG), *args]) == 0
    wider = [*args, "model.arch={embed_dim: 64, depth: 2, num_heads: 4}"]
    assert main_pretrain.main(["--fname", str(CONFIG), *wider]) == 2  # no --resume: refused
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path} holds the outputs of another run (checkpoint-last.pth, "
        "results.json, log.jsonl): pass --resume to continue it, --overwrite to replace it, or "
        "use a new logging.folder"
    )
    assert main_pretrain.main(["--fname", str(CONFIG), *wider, "--resume"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --resume: model.arch.embed_dim 32 -> 64 differ from ")
    (tmp_path / "config.yaml").unlink()  # no saved config: the checkpoint itself does not fit
    assert main_pretrain.main(["--fname", str(CONFIG), *wider, "--resume"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'checkpoint-last.pth'}: its encoder state does "
                           "not fit this run's encoder")  # fmt: skip
    assert "size mismatch" in last
