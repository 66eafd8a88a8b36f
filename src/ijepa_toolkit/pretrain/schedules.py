"""The official I-JEPA schedules (default) and the featurenorm seed's, as pure functions of the
iteration counter.

The official loop calls ``scheduler.step()`` and ``wd_scheduler.step()`` at the start of every
iteration (so iteration ``i``, counted from 0, runs with ``step = i + 1``) and takes the EMA
momentum for iteration ``i`` from a generator that yields ``i = 0, 1, ...``. ``total_steps`` is
``int(ipe_scale * epochs * iterations_per_epoch)`` and ``warmup_steps`` is
``int(warmup_epochs * iterations_per_epoch)``.

The featurenorm seed (theAdamColton/elucidating-featurenorm-ijepa@eb093c21, ``src/trainer.py``
``Trainer.lr`` / ``Trainer.ema_beta``) reads both at its ``global_step`` before the increment, so
iteration ``i`` uses step ``i`` for the lr and the momentum; its phases are counted in iterations.
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


def _ramp(step: int, steps: int) -> float:
    """``step / steps``; 1 for an empty phase (the seed divides by zero there)."""
    return step / steps if steps else 1.0


def warmup_steady_cooldown_lr(
    step: int, start_lr: float, steady_lr: float, end_lr: float, warmup_steps: int,
    steady_steps: int, cooldown_steps: int,
) -> float:  # fmt: skip
    """The seed's ``Trainer.lr``: linear ``start_lr -> steady_lr`` up to ``warmup_steps``
    (inclusive), ``steady_lr`` for ``steady_steps`` more, then linear to ``end_lr`` over
    ``cooldown_steps`` and ``end_lr`` after."""
    if step <= warmup_steps:
        return (steady_lr - start_lr) * _ramp(step, warmup_steps) + start_lr
    if step - warmup_steps <= steady_steps:
        return steady_lr
    scale = _ramp(step - warmup_steps - steady_steps, cooldown_steps)
    return max(steady_lr - scale * (steady_lr - end_lr), end_lr)


def three_phase_ema(
    step: int, start: float, steady: float, end: float, warmup_steps: int, steady_steps: int
) -> float:
    """The seed's ``Trainer.ema_beta``: linear ``start -> steady`` up to ``warmup_steps``
    (inclusive), then linear from ``steady`` towards ``end`` over ``steady_steps``, capped at
    ``end`` (``min``, as the seed: with ``end < steady`` the momentum is ``end`` after warm-up)."""
    if step <= warmup_steps:
        return _ramp(step, warmup_steps) * (steady - start) + start
    scale = _ramp(step - warmup_steps, steady_steps)
    return min(steady - scale * (steady - end), end)


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
    lr_schedule: str = "warmup_cosine"  # or "warmup_steady_cooldown" (featurenorm)
    lr_steps: tuple[int, int, int] = (10000, 250000, 50000)  # warm-up, steady, cool-down
    ema_schedule: str = "linear"  # or "three_phase" (featurenorm)
    ema_phases: tuple[float, float, float] = (0.8, 0.996, 0.9999)  # start, steady, end
    ema_steps: tuple[int, int] = (1000, 400000)  # warm-up, steady

    @property
    def total_steps(self) -> int:
        return int(self.ipe_scale * self.epochs * self.iterations_per_epoch)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_epochs * self.iterations_per_epoch)

    def at(self, i: int) -> tuple[float, float, float]:
        """(lr, weight decay, EMA momentum) used by iteration ``i`` (0-based, global)."""
        total = self.total_steps
        if self.lr_schedule == "warmup_steady_cooldown":
            lr = warmup_steady_cooldown_lr(i, self.start_lr, self.lr, self.final_lr, *self.lr_steps)
        else:
            lr = warmup_cosine_lr(
                i + 1, self.warmup_steps, self.start_lr, self.lr, self.final_lr, total
            )
        wd = cosine_wd(i + 1, self.weight_decay, self.final_weight_decay, total)
        if self.ema_schedule == "three_phase":
            momentum = three_phase_ema(i, *self.ema_phases, *self.ema_steps)
        else:
            steps = self.iterations_per_epoch * self.epochs * self.ipe_scale
            momentum = ema_momentum(i, self.ema[0], self.ema[1], steps)
        return lr, wd, momentum
