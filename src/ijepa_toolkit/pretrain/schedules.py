"""The official I-JEPA schedules as pure functions of the iteration counter.

The official loop calls ``scheduler.step()`` and ``wd_scheduler.step()`` at the start of every
iteration (so iteration ``i``, counted from 0, runs with ``step = i + 1``) and takes the EMA
momentum for iteration ``i`` from a generator that yields ``i = 0, 1, ...``. ``total_steps`` is
``int(ipe_scale * epochs * iterations_per_epoch)`` and ``warmup_steps`` is
``int(warmup_epochs * iterations_per_epoch)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine_lr(
    step: int, warmup_steps: int, start_lr: float, ref_lr: float, final_lr: float, total_steps: int
) -> float:
    """``WarmupCosineSchedule``: linear ``start_lr`` -> ``ref_lr``, then cosine to ``final_lr``."""
    if step < warmup_steps:
        progress = step / max(1, warmup_steps)
        return start_lr + progress * (ref_lr - start_lr)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(
        final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    )


def cosine_wd(step: int, ref_wd: float, final_wd: float, total_steps: int) -> float:
    """``CosineWDSchedule``: cosine from ``ref_wd`` to ``final_wd``, clamped at ``final_wd``."""
    progress = step / total_steps
    wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)


def ema_momentum(i: int, start: float, end: float, total_steps: float) -> float:
    """Linear EMA momentum ``start + i * (end - start) / total_steps`` (official generator)."""
    return start + i * (end - start) / total_steps


@dataclass
class Schedules:
    """All three schedules of one run; ``at(i)`` gives (lr, wd, momentum) for iteration ``i``."""

    iterations_per_epoch: int
    epochs: int
    warmup_epochs: float
    start_lr: float
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema: tuple[float, float] = (0.996, 1.0)
    ipe_scale: float = 1.0

    @property
    def total_steps(self) -> int:
        return int(self.ipe_scale * self.epochs * self.iterations_per_epoch)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_epochs * self.iterations_per_epoch)

    def at(self, i: int) -> tuple[float, float, float]:
        """(lr, weight decay, EMA momentum) used by iteration ``i`` (0-based, global)."""
        total = self.total_steps
        lr = warmup_cosine_lr(
            i + 1, self.warmup_steps, self.start_lr, self.lr, self.final_lr, total
        )
        wd = cosine_wd(i + 1, self.weight_decay, self.final_weight_decay, total)
        momentum = ema_momentum(
            i, self.ema[0], self.ema[1], self.iterations_per_epoch * self.epochs * self.ipe_scale
        )
        return lr, wd, momentum
