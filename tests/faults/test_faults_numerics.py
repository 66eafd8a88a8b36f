"""Gradient overflow under a loss scaler: the step is skipped (weights untouched), the scale goes
down, and the skip is counted. CPU has no fp16 training path here, so the overflow is produced
the way fp16 produces it: a loss scale so large that the scaled gradients are inf in float32."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ijepa_toolkit.engine.logger import RunLogger
from ijepa_toolkit.finetune import recipe
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.finetune.engine import StepOptions, TrainState, train_one_epoch

from .common import REPO


def train(steps: int, init_scale: float, tmp_path: Path):
    cfg = FinetuneConfig()
    cfg.model.checkpoint = str(REPO / "tests/fixtures/ijepa_vit_p8_d64.pth.tar")
    cfg.model.num_heads, cfg.data.img_size, cfg.optimization.warmup_epochs = 4, 32, 0.0
    torch.manual_seed(0)
    model = recipe.build_classifier(cfg, num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = recipe.build_optimizer(
        recipe.param_groups(model, cfg.optimization), cfg.optimization, 1e-3
    )
    scheduler = recipe.build_scheduler(optimizer, cfg.optimization, steps)
    data = TensorDataset(torch.randn(4 * steps, 3, 32, 32), torch.arange(4 * steps) % 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    opts = StepOptions(device=torch.device("cpu"), scaler=scaler, steps_per_epoch=steps)
    criterion = lambda logits, y: 1e6 * F.cross_entropy(logits, y)  # noqa: E731  (big grads)
    out = train_one_epoch(model, criterion, DataLoader(data, batch_size=4),
                          optimizer, scheduler, TrainState(), opts,
                          RunLogger(tmp_path, enabled=False))  # fmt: skip
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    return out, scaler, moved


def test_overflowing_step_is_skipped_and_counted(tmp_path, caplog):
    out, scaler, moved = train(1, 2.0**127, tmp_path)
    assert out["overflow"] == 1 and moved == []  # skipped: no weight changed
    assert scaler.get_scale() == 2.0**126
    assert "step 1: gradient overflow, step skipped" in caplog.text


def test_training_goes_on_once_the_scale_fits(tmp_path):
    out, scaler, moved = train(40, 2.0**127, tmp_path)
    halvings = round(math.log2(2.0**127 / scaler.get_scale()))
    assert 1 <= out["overflow"] == halvings < 40  # each skip halved the scale, then steps ran
    assert moved and math.isfinite(out["loss"])
    out, scaler, moved = train(2, 2.0**16, tmp_path)  # a sane scale: nothing skipped
    assert out["overflow"] == 0 and scaler.get_scale() == 2.0**16 and moved
