"""``train_one_epoch`` and ``evaluate`` for finetuning (the MAE ``engine_finetune.py`` pair)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine.distributed import all_reduce_sum
from ..engine.logger import RunLogger
from ..engine.resume import unwrap
from ..engine.utils import autocast, progress

logger = logging.getLogger("ijepa_toolkit")


@dataclass
class TrainState:
    """Counters saved in checkpoints: enough to continue a run exactly where it stopped."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # micro-batches done in the current epoch
    best_top1: float = -1.0


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
    clipped (or just measured), stepped; a non-finite loss stops the run before its step. Every
    ``log_freq`` steps a row (loss averaged over the step's micro-batches and the ranks, max group
    lr, grad norm) goes to ``log.jsonl``; every ``checkpoint_every`` steps ``save()`` is called
    (on every rank). Returns ``{"loss", "skipped", "overflow"}``: mean step loss, unreadable
    images skipped (summed over ranks) and optimizer steps the fp16 scaler skipped because a
    gradient overflowed (its scale went down).
    """
    model.train()
    accum, per_batch = opts.accum_iter, loader.batch_size
    end = opts.steps_per_epoch * accum  # micro-batches in a full epoch (a ragged tail is dropped)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler, losses, step_losses, skipped, overflow = opts.scaler, [], [], 0, 0
    todo = max(end - state.batch, 0)
    for batch in progress(itertools.islice(loader, todo), desc=f"epoch {state.epoch}", total=todo):
        if batch is None:
            raise RuntimeError(
                f"every image of a training batch was unreadable (epoch "
                f"{state.epoch}, batch {state.batch}); see the warnings above"
            )
        images, targets = batch
        skipped += per_batch - len(targets)
        images = images.to(opts.device, non_blocking=True)
        targets = targets.to(opts.device, non_blocking=True)
        if opts.mixup is not None:
            if len(targets) % 2:  # a skipped image left an odd batch: Mixup needs pairs
                images, targets = images[:-1], targets[:-1]
            images, targets = opts.mixup(images, targets)
        if state.batch % accum == 0:
            scheduler.step_update(state.step)
        last = (state.batch + 1) % accum == 0
        sync = contextlib.nullcontext()
        if not last and isinstance(model, DistributedDataParallel):
            sync = model.no_sync()
        with sync:
            with autocast(opts.device, opts.amp_dtype is not None, opts.amp_dtype or torch.float32):
                loss = criterion(model(images), targets)
            scaler.scale(loss / accum).backward()
        step_losses.append(loss.detach())
        state.batch += 1
        if not last:
            continue
        step_loss = _reduce_mean(torch.stack(step_losses).mean())  # the same on every rank
        step_losses.clear()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {state.step + 1}; stopping")
        scaler.unscale_(optimizer)
        max_norm = opts.clip_grad if opts.clip_grad is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:  # inf/nan gradient: step skipped
            overflow += 1
            logger.warning("step %d: gradient overflow, step skipped (loss scale %g -> %g)",
                           state.step + 1, scale, scaler.get_scale())  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if opts.ema is not None:
            opts.ema.update(unwrap(model), step=state.step)
        losses.append(step_loss)
        if state.step % opts.log_freq == 0:
            lr = max(g["lr"] for g in optimizer.param_groups)
            epoch_f = state.epoch + state.batch / end
            run_log.log(step=state.step, epoch=epoch_f, loss=step_loss, lr=lr, grad_norm=grad_norm)
            logger.info(
                "epoch %.3f step %d loss %.4f lr %.3e grad_norm %.3f",
                epoch_f,
                state.step,
                step_loss,
                lr,
                grad_norm,
            )
        if save is not None and opts.checkpoint_every and state.step % opts.checkpoint_every == 0:
            save()
    total_skipped = int(all_reduce_sum(torch.tensor([skipped], device=opts.device)).item())
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return {"loss": mean_loss, "skipped": total_skipped, "overflow": overflow}


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
    for batch in progress(loader, desc="eval"):
        if batch is None:
            continue
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        with autocast(device, amp_dtype is not None, amp_dtype or torch.float32):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        sums += torch.stack(
            [
                torch.tensor(float(len(targets)), device=device),
                ce(logits, targets).double(),
                hits[:, 0].sum().double(),
                hits.sum().double(),
            ]
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
