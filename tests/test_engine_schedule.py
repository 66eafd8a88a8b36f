"""``engine.utils.warmup_cosine`` (finetuning and depth probe schedules) against MAE's rule."""

from __future__ import annotations

import math

import pytest
import torch

from ijepa_toolkit.engine.utils import warmup_cosine


def mae_lr(epoch: float, lr: float, min_lr: float, epochs: float, warmup_epochs: float) -> float:
    """MAE's ``adjust_learning_rate``, written from facebookresearch/mae ``util/lr_sched.py`` at
    commit efb2a8062c206524e35e47d04501ed4f544c0ae8; ``engine_finetune.py`` calls it with the
    fractional epoch ``data_iter_step / len(data_loader) + epoch``. Each group then gets
    ``lr * lr_scale`` when it has an ``lr_scale``, else ``lr``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def groups(lr: float) -> torch.optim.Optimizer:
    """Three groups as layer decay builds them (``lr_scale`` 0.36, 0.6) and one without."""
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    return torch.optim.AdamW([
        {"params": [ps[0]], "lr_scale": 0.36}, {"params": [ps[1]], "lr_scale": 0.6},
        {"params": [ps[2]]},
    ], lr=lr)  # fmt: skip


@pytest.mark.parametrize(
    "epochs, steps_per_epoch, warmup_epochs, min_lr",
    [(4, 25, 0.5, 0.0), (3, 7, 1.3, 1e-6), (2, 10, 0.0, 1e-5), (5, 3, 2, 0.0)],
)
def test_lr_at_every_step_is_mae_formula_with_each_group_scale(
    epochs, steps_per_epoch, warmup_epochs, min_lr
):
    """Before: the warmup was rounded to whole steps (12.5 -> 12), e.g. 1.875e-3 instead of
    MAE's 1.8e-3 at step 12 of 25 per epoch with warmup_epochs 0.5."""
    lr = 1.875e-3
    optimizer = groups(lr)
    scheduler = warmup_cosine(optimizer, epochs, steps_per_epoch, warmup_epochs, min_lr)
    for step in range(epochs * steps_per_epoch):
        scheduler.step_update(step)
        want = mae_lr(step / steps_per_epoch, lr, min_lr, epochs, warmup_epochs)
        got = [g["lr"] for g in optimizer.param_groups]
        assert got == pytest.approx([want * 0.36, want * 0.6, want], rel=1e-12, abs=1e-18), step


def test_half_epoch_warmup_step_12_of_25():
    optimizer = groups(1.875e-3)
    warmup_cosine(optimizer, 4, 25, 0.5).step_update(12)
    assert optimizer.param_groups[2]["lr"] == pytest.approx(1.8e-3, rel=1e-12)
