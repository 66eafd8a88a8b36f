"""Progress reports where stderr is not a terminal (nohup, SLURM, torchrun logs): periodic log
lines with done/total, a rate and an ETA (``engine.utils.progress``), in an extraction and in a
training epoch."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ijepa_toolkit.config import EncoderSection
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.engine.logger import RunLogger
from ijepa_toolkit.engine.utils import progress, warmup_cosine
from ijepa_toolkit.errors import UserError
from ijepa_toolkit.eval.features import (
    EvalDataSection,
    build_eval_dataset,
    load_or_extract,
    model_identity,
)
from ijepa_toolkit.finetune.engine import StepOptions, TrainState, train_one_epoch
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

ARCH = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4)
LINE = re.compile(
    r"(?P<desc>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \([\d.]+%\), "
    r"(?P<rate>[\d.e+]+) (?P=unit)/s, ETA (?P<eta>\d+[hms][\dhms]*)(?P<extra>.*)"
)


@pytest.fixture
def log_lines(monkeypatch):
    """What the ``ijepa_toolkit`` logger writes, with stderr a pipe (not a terminal)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # isatty() is False
    stream = io.StringIO()
    log = logging.getLogger("ijepa_toolkit")
    log.addHandler(logging.StreamHandler(stream))
    log.setLevel(logging.INFO)
    return lambda: stream.getvalue().splitlines()


def progress_lines(lines: list[str], desc: str) -> list[re.Match]:
    return [m for m in map(LINE.fullmatch, lines) if m and m["desc"].startswith(desc)]


def test_extraction_logs_images_done_rate_and_eta(tmp_path, monkeypatch, log_lines):
    monkeypatch.setenv("IJEPA_PROGRESS_ITEMS", "1")  # a line per batch
    train, _ = build_digits_imagefolder(tmp_path / "digits", 16, per_class=5)
    data = EvalDataSection(img_size=16, crop_ratio=1.0, batch_size=8, num_workers=0)
    ds = build_eval_dataset(str(train), data)
    n = len(ds)
    ident = model_identity(EncoderSection(arch=ARCH), 0, tmp_path / "cache")
    fs = load_or_extract(ds, ident, lambda: create_encoder(EncoderArch(**ARCH)).eval(), "last",
                         tmp_path / "cache", DistInfo(), batch_size=8)  # fmt: skip
    assert fs.feats.shape == (n, 32)
    found = progress_lines(log_lines(), "features last")
    per_batch = [min(i + 8, n) for i in range(0, n, 8)]
    assert [int(m["done"]) for m in found] == [*per_batch[:-1], n]  # a line a batch; the end
    assert {m["total"] for m in found} == {str(n)} and {m["unit"] for m in found} == {"img"}
    assert all(float(m["rate"]) > 0 for m in found)
    assert "done in" in found[-1]["extra"] and "done in" not in found[0]["extra"]


def test_training_epoch_logs_steps_rate_eta_loss_and_lr(tmp_path, monkeypatch, log_lines):
    monkeypatch.setenv("IJEPA_PROGRESS_ITEMS", "3")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(36, 3, 2, 2), torch.randint(0, 3, (36,)))
    opts = StepOptions(device=torch.device("cpu"), steps_per_epoch=9,
                       scaler=torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip
    scheduler = warmup_cosine(optimizer, 1, 9, 0)
    train_one_epoch(model, nn.CrossEntropyLoss(), DataLoader(data, batch_size=4), optimizer,
                    scheduler, TrainState(), opts, RunLogger(tmp_path, enabled=False))  # fmt: skip
    found = progress_lines(log_lines(), "epoch 1")
    assert [int(m["done"]) for m in found] == [3, 6, 9]
    assert {m["total"] for m in found} == {"9"} and {m["unit"] for m in found} == {"it"}
    for m in found:
        loss = float(re.search(r"loss ([\d.e+-]+)", m["extra"])[1])
        lr = float(re.search(r"lr ([\d.e+-]+)", m["extra"])[1])
        assert 0 < loss < 10 and 0 <= lr <= 0.1


def test_time_trigger_and_quiet_short_loops(monkeypatch, log_lines):
    ticks = iter(range(0, 1000, 7))  # each clock read 7 s later
    monkeypatch.setattr("ijepa_toolkit.engine.utils.time.monotonic", lambda: next(ticks))
    assert list(progress(range(4), "slow", every_s=20, every_n=0)) == [0, 1, 2, 3]
    found = progress_lines(log_lines(), "slow")
    assert [int(m["done"]) for m in found] == [3, 4]  # 21 s after the start, then the end
    assert found[0]["eta"] == "7s"  # 1 item left at 1 item / 7 s
    before = len(log_lines())
    list(progress(range(5), "fast", every_s=0, every_n=10))
    assert len(log_lines()) == before  # nothing for a loop shorter than both triggers


def test_non_number_interval_in_the_environment_is_a_user_error(monkeypatch):
    monkeypatch.setenv("IJEPA_PROGRESS_SECONDS", "often")
    with pytest.raises(UserError, match="IJEPA_PROGRESS_SECONDS='often': expected a number"):
        progress([1, 2], "x")
