"""``train_one_epoch`` and ``evaluate`` for finetuning (the MAE ``engine_finetune.py`` pair)."""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from timm.utils import accuracy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine.distributed import all_reduce_sum
from ..engine.logger import RunLogger
from ..engine.resume import unwrap
from ..engine.utils import autocast, clip_grad_norm, progress
from ..runs import check_finite

logger = logging.getLogger("ijepa_toolkit")


@dataclass
class TrainState:
    """Counters saved in checkpoints: enough to continue a run exactly where it stopped.

    The running sums of the current epoch are saved too, so the epoch's metrics after a
    mid-epoch resume are the uninterrupted run's (the same sums in the same order)."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # micro-batches done in the current epoch
    best_top1: float = -1.0
    loss_sum: float = 0.0  # sum of the current epoch's step losses (mean over ranks)
    loss_steps: int = 0  # steps in loss_sum
    overflow: int = 0  # steps of the current epoch the fp16 scaler skipped
    skipped: int = 0  # unreadable images of the current epoch, this rank's

    def new_epoch(self) -> None:
        """Epoch ``epoch`` finished: the next one starts with empty sums."""
        self.epoch, self.batch = self.epoch + 1, 0
        self.loss_sum, self.loss_steps, self.overflow, self.skipped = 0.0, 0, 0, 0

    def epoch_sums(self, device: torch.device) -> dict:
        """The running sums to checkpoint: ``skipped`` summed over ranks (collective: every
        rank calls it); a resumed rank 0 carries it, the other ranks start at 0."""
        skipped = int(all_reduce_sum(torch.tensor([self.skipped], device=device)).item())
        return {"loss_sum": self.loss_sum, "loss_steps": self.loss_steps,
                "overflow": self.overflow, "skipped": skipped}  # fmt: skip


@dataclass
class StepOptions:
    """How one training step runs."""

    device: torch.device
    accum_iter: int = 1
    clip_grad: Optional[float] = None
    amp_dtype: Optional[torch.dtype] = None  # None: fp32
    scaler: Any = None  # torch.amp.GradScaler (disabled unless fp16 on CUDA)
    mixup: Optional[Callable] = None
    ema: Optional[nn.Module] = None  # timm ModelEmaV3
    log_freq: int = 10
    checkpoint_every: int = 0
    steps_per_epoch: int = 0
    last_good: Optional[Path] = None  # newest checkpoint written: named if the loss diverges


def _reduce_mean(value: torch.Tensor) -> float:
    """Mean over ranks of a scalar (a no-op in one process)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return all_reduce_sum(value.detach().float().clone()).item() / world


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    opts: StepOptions,
    run_log: RunLogger,
    save: Optional[Callable[[], None]] = None,
) -> dict:
    """Train on the rest of epoch ``state.epoch`` (``loader``'s sampler already skips what's done).

    Each batch: (B, C, H, W) images and (B,) labels, mixed by ``opts.mixup`` into (B, K) soft
    targets. The lr is set per optimizer step by ``scheduler.step_update(state.step)``; gradients
    accumulate over ``accum_iter`` micro-batches (DDP syncs only on the last), are unscaled,
    clipped (or just measured), stepped; a non-finite loss stops the run before its step
    (``TrainingDiverged`` naming ``opts.last_good``). Every ``log_freq`` steps a row (loss
    averaged over the step's micro-batches and the ranks, max group lr, grad norm) goes to
    ``log.jsonl``; every ``checkpoint_every`` steps ``save()`` is called (on every rank). Returns
    ``{"loss", "skipped", "overflow"}``: mean step loss, unreadable images skipped (summed over
    ranks) and optimizer steps the fp16 scaler skipped because a gradient overflowed, over
    the whole epoch (the running sums in ``state`` carry the part before a resume).
    """
    model.train()
    accum = opts.accum_iter
    end = opts.steps_per_epoch * accum  # micro-batches in a full epoch (a ragged tail is dropped)
    params = [p for p in model.parameters() if p.requires_grad]
    step_losses = []
    todo = max(end - state.batch, 0)
    bar = progress(itertools.islice(loader, todo), f"epoch {state.epoch + 1}", todo)
    for batch in bar:
        images, targets, missing = _prepare(batch, state, opts, loader.batch_size)
        state.skipped += missing
        if state.batch % accum == 0:
            scheduler.step_update(state.step)
        last = (state.batch + 1) % accum == 0
        step_losses.append(_backward(model, criterion, images, targets, opts, sync=last))
        state.batch += 1
        if not last:
            continue
        step_loss = _reduce_mean(torch.stack(step_losses).mean())  # the same on every rank
        step_losses.clear()
        where = f"step {state.step + 1} (epoch {state.epoch + 1})"
        check_finite(step_loss, where, opts.last_good)
        grad_norm, overflowed = _optimizer_step(params, optimizer, opts, state.step + 1)
        state.overflow += overflowed
        state.step += 1
        if opts.ema is not None:
            opts.ema.update(unwrap(model), step=state.step)
        state.loss_sum += step_loss
        state.loss_steps += 1
        bar.set(loss=step_loss, lr=max(g["lr"] for g in optimizer.param_groups))
        if state.step % opts.log_freq == 0:
            _log_step(run_log, optimizer, state, state.epoch + state.batch / end, step_loss,
                      grad_norm)  # fmt: skip
        if save is not None and opts.checkpoint_every and state.step % opts.checkpoint_every == 0:
            save()
    skipped = int(all_reduce_sum(torch.tensor([state.skipped], device=opts.device)).item())
    mean_loss = state.loss_sum / state.loss_steps if state.loss_steps else float("nan")
    return {"loss": mean_loss, "skipped": skipped, "overflow": state.overflow}


def _prepare(
    batch: Optional[tuple], state: TrainState, opts: StepOptions, per_batch: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, C, H, W) images and (B,) or (B, K) mixed targets on the device, and how many images
    of the batch were unreadable (skipped)."""
    if batch is None:
        raise RuntimeError(
            f"every image of a training batch was unreadable (epoch {state.epoch}, batch "
            f"{state.batch}); see the warnings above"
        )
    images, targets = batch
    missing = per_batch - len(targets)
    images = images.to(opts.device, non_blocking=True)
    targets = targets.to(opts.device, non_blocking=True)
    if opts.mixup is not None:
        if len(targets) % 2:  # a skipped image left an odd batch: Mixup needs pairs
            images, targets = images[:-1], targets[:-1]
        images, targets = opts.mixup(images, targets)
    return images, targets, missing


def _backward(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    opts: StepOptions,
    sync: bool,
) -> torch.Tensor:
    """Forward + scaled backward of one micro-batch (``loss / accum_iter``); DDP all-reduces the
    gradients only when ``sync``. Returns the unscaled loss, detached."""
    context = contextlib.nullcontext()
    if not sync and isinstance(model, DistributedDataParallel):
        context = model.no_sync()
    with context:
        with autocast(opts.device, opts.amp_dtype is not None, opts.amp_dtype or torch.float32):
            loss = criterion(model(images), targets)
        opts.scaler.scale(loss / opts.accum_iter).backward()
    return loss.detach()


def _optimizer_step(
    params: list, optimizer: torch.optim.Optimizer, opts: StepOptions, step: int
) -> tuple[torch.Tensor, int]:
    """Unscale, clip (or just measure) and step; returns (grad norm, 1 if the fp16 scaler skipped
    the step because a gradient overflowed, else 0)."""
    scaler = opts.scaler
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(params, opts.clip_grad)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scale is not None and scaler.get_scale() < scale:  # inf/nan gradient: step skipped
        logger.warning("step %d: gradient overflow, step skipped (loss scale %g -> %g)",
                       step, scale, scaler.get_scale())  # fmt: skip
        return grad_norm, 1
    return grad_norm, 0


def _log_step(
    run_log: RunLogger,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    epoch: float,
    loss: float,
    grad_norm: torch.Tensor,
) -> None:
    lr = max(g["lr"] for g in optimizer.param_groups)
    run_log.log(step=state.step, epoch=epoch, loss=loss, lr=lr, grad_norm=grad_norm)
    logger.info("epoch %.3f step %d loss %.4f lr %.3e grad_norm %.3f", epoch, state.step, loss,
                lr, grad_norm)  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict:
    """Top-1/top-5 accuracy (%) and mean CE loss over the whole validation set.

    With ``ShardSampler(shuffle=False)`` every image is seen on exactly one rank; sums of counts
    are reduced over ranks, so the result equals one process's. ``skipped``: unreadable images.
    """
    model = unwrap(model).eval()
    ce = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # images, loss, top-1, top-5 hits
    for batch in progress(loader, "eval"):
        if batch is None:
            continue
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        with autocast(device, amp_dtype is not None, amp_dtype or torch.float32):
            logits = model(images)
        logits, n = logits.float(), len(targets)
        top1, top5 = (a * n / 100 for a in accuracy(logits, targets, topk=(1, 5)))  # % -> hits
        hits = torch.stack([top1, top5]).round().double()
        loss = ce(logits, targets).double()[None]
        sums += torch.cat(
            [torch.tensor([float(n)], device=device, dtype=torch.float64), loss, hits]
        )
    n, loss, top1, top5 = all_reduce_sum(sums).tolist()
    n_total = len(loader.dataset)
    return {
        "acc1": 100.0 * top1 / max(n, 1),
        "acc5": 100.0 * top5 / max(n, 1),
        "loss": loss / max(n, 1),
        "images": int(n),
        "skipped": n_total - int(n),
    }
