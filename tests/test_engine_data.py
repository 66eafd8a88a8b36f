"""Shared plumbing: run logs, RNG state round trip, digits ImageFolder, bad-image skipping."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.data.folder import SafeImageFolder, collate_skip_none
from ijepa_toolkit.data.transforms import eval_transform
from ijepa_toolkit.engine.logger import RunLogger, read_jsonl
from ijepa_toolkit.engine.utils import rng_state, seed_everything, set_rng_state
from ijepa_toolkit.io.save import save_checkpoint


def test_run_logger_appends_and_survives_reopen(tmp_path):
    log = RunLogger(tmp_path, tensorboard=True)
    log.log(step=0, loss=torch.tensor(1.5), lr=0.1)
    log.close()
    log = RunLogger(tmp_path, tensorboard=False)
    log.log(step=1, loss=float("nan"))
    log.close()
    rows = read_jsonl(tmp_path / "log.jsonl")
    assert rows == [{"step": 0, "loss": 1.5, "lr": 0.1}, {"step": 1, "loss": "nan"}]
    assert any((tmp_path / "tensorboard").iterdir())


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "r", enabled=False)
    log.log(step=0, loss=1.0)
    log.close()
    assert not (tmp_path / "r").exists()


def test_results_json_has_one_schema(tmp_path):
    import json

    import timm

    from ijepa_toolkit.runs import write_results

    write_results(tmp_path, "finetune", {"top1": 0.5}, encoder_checkpoint="c.pth",
                  which="target_encoder", output_checkpoint="out.pth", settings={"lr": 1e-3},
                  epochs=2)  # fmt: skip
    data = json.loads((tmp_path / "results.json").read_text())
    env = data.pop("environment")
    encoder = {"path": os.path.abspath("c.pth"), "missing": True}
    assert data.pop("inputs") == {"config": None, "data": {}, "encoder": encoder}  # no config.yaml
    assert data == {"protocol": "finetune", "encoder_checkpoint": "c.pth",
                    "which": "target_encoder", "output_checkpoint": "out.pth",
                    "metrics": {"top1": 0.5}, "settings": {"lr": 1e-3}, "epochs": 2}  # fmt: skip
    assert env["torch"] == torch.__version__ and env["timm"] == timm.__version__
    assert env["threads"] == torch.get_num_threads() and env["device"].startswith(("cpu", "cuda"))
    write_results(tmp_path, "pretrain", {"loss": 0.1}, encoder_checkpoint=None, which=None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert (data["encoder_checkpoint"], data["which"], data["output_checkpoint"]) == (
        None, "random_init", None
    )  # fmt: skip


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    seed_everything(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint({"rng": state}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)["rng"]
    seed_everything(99)
    set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_digits_imagefolder_is_stratified_and_cached(tmp_path):
    train, val = build_digits_imagefolder(tmp_path / "digits", size=16, per_class=8)
    train_ds, val_ds = SafeImageFolder(train), SafeImageFolder(val)
    assert len(train_ds) + len(val_ds) == 80 and len(train_ds.classes) == 10
    assert sorted(set(val_ds.targets)) == list(range(10))
    img, _ = train_ds[0]
    assert img.size == (16, 16) and img.mode == "RGB"
    stamp = (train / "0").stat().st_mtime_ns
    build_digits_imagefolder(tmp_path / "digits", size=16, per_class=8)
    assert (train / "0").stat().st_mtime_ns == stamp


def test_corrupt_image_is_skipped_with_warning(tmp_path, caplog):
    train, _ = build_digits_imagefolder(tmp_path / "digits", size=16, per_class=4)
    bad = train / "3" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = SafeImageFolder(train, transform=eval_transform(16, crop_ratio=1.0))
    loader = DataLoader(ds, batch_size=len(ds), collate_fn=collate_skip_none)
    with caplog.at_level("WARNING", logger="ijepa_toolkit"):
        images, targets = next(iter(loader))
    assert images.shape == (len(ds) - 1, 3, 16, 16) and len(targets) == len(ds) - 1
    assert "zz_corrupt.png" in caplog.text
    strict = SafeImageFolder(train, on_error="raise")
    index = [p for p, _ in strict.samples].index(str(bad))
    with pytest.raises(OSError, match="zz_corrupt.png"):
        strict[index]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        SafeImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        SafeImageFolder(tmp_path / "empty")


def test_training_state_resumes_weights_optimizer_and_rng(tmp_path):
    from ijepa_toolkit.engine.resume import load_training_state, save_training_state

    def step(model, opt):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    step(model, opt)
    save_training_state(
        tmp_path / "last.pth", model=model, optimizer=opt, epoch=1, step=1, best=0.5
    )
    step(model, opt)
    expected = model.weight.detach().clone()

    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    torch.manual_seed(123)
    state = load_training_state(tmp_path / "last.pth", other, other_opt)
    step(other, other_opt)
    assert state["epoch"] == 1 and state["step"] == 1 and state["best"] == 0.5
    assert torch.equal(other.weight, expected)


def test_resuming_into_a_changed_run_names_the_file_and_the_part(tmp_path):
    from ijepa_toolkit.engine.resume import load_training_state, save_training_state
    from ijepa_toolkit.errors import CheckpointError

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "last.pth"
    save_training_state(path, model=model, optimizer=opt, epoch=1, step=1)
    wider = torch.nn.Linear(3, 4)  # e.g. another class count
    with pytest.raises(CheckpointError, match=rf"^{path}: its model state does not fit .*size"):
        load_training_state(path, wider, torch.optim.SGD(wider.parameters(), lr=0.1))
    groups = [{"params": [model.weight]}, {"params": [model.bias]}]  # e.g. another lr grid
    with pytest.raises(CheckpointError, match=rf"^{path}: its optimizer state does not fit"):
        load_training_state(path, model, torch.optim.SGD(groups, lr=0.1))
