"""Linear probes over a (learning rate, weight decay) grid, all trained in one pass over the data
(DINOv2 style).

One ``LinearHead`` (optionally ``BatchNorm1d(affine=False)`` first, as MAE) per grid point; each
batch of features goes through every head and the summed loss trains them all at once (the heads
share no parameters, so each gets exactly its own gradient and its own weight decay). Learning
rates are ``base_lr * global_batch / 256`` with timm's schedulers per step: a linear warmup, then
a cosine decay (MAE) or a step decay (I-JEPA / VISSL: x ``decay_factor`` every ``decay_epochs``).
The head to report is picked on a held-out part of the training set (``eval.linear``). Under
torch.distributed the heads train as one ``DistributedDataParallel`` module (gradients averaged
over ranks, each rank its own batches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from timm.scheduler import StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine.distributed import DistInfo
from ..engine.utils import progress, warmup_cosine
from ..models.heads import LinearHead
from .metrics import topk_hits

if TYPE_CHECKING:  # the choices are the config's (eval.linear, which imports this module lazily)
    from .linear import Optimizer, Schedule


def make_heads(in_dim: int, num_classes: int, n: int, batchnorm: bool) -> nn.ModuleList:
    """``n`` independent linear heads (MAE init: weights ~ trunc-normal std 0.01, zero bias)."""
    return nn.ModuleList(LinearHead(in_dim, num_classes, batchnorm) for _ in range(n))


def make_optimizer(
    heads: nn.ModuleList,
    grid: Sequence[tuple[float, float]],
    name: Optimizer,
    momentum: float,
) -> torch.optim.Optimizer:
    """SGD or LARS (timm) with each head's own (lr, weight decay) from ``grid``.

    As MAE's LARS: weight matrices get weight decay and the layer-wise trust ratio (timm's
    ``always_adapt``, so also at weight decay 0, where timm would otherwise skip it); biases (1-D)
    get neither, with either optimizer.
    """
    groups = []
    for head, (lr, wd) in zip(heads, grid):
        params = list(head.parameters())
        for matrices, decay in ((True, wd), (False, 0.0)):
            group = [p for p in params if (p.ndim > 1) == matrices]
            if group:
                groups.append({"params": group, "lr": lr, "weight_decay": decay})
                if name == "lars":
                    groups[-1]["always_adapt"] = matrices
    if name == "sgd":
        return torch.optim.SGD(groups, lr=grid[0][0], momentum=momentum)
    from timm.optim import Lars

    return Lars(groups, lr=grid[0][0], momentum=momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: Schedule,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    decay_epochs: int = 15,
    decay_factor: float = 0.1,
) -> Scheduler:
    """timm scheduler in optimizer steps (``step_update(step)`` before each step): linear warmup
    from 0 over ``warmup_epochs`` (MAE), then ``cosine`` to 0 at the last step (MAE's
    ``adjust_learning_rate`` per step) or ``step`` (x ``decay_factor`` every ``decay_epochs``
    epochs counted from the start of training, VISSL's multi-step). Each group keeps its own lr."""
    if name == "cosine":
        return warmup_cosine(optimizer, epochs, steps_per_epoch, warmup_epochs)
    warmup = warmup_epochs * steps_per_epoch  # not rounded to whole steps (MAE's formula)
    return StepLRScheduler(
        optimizer, decay_t=decay_epochs * steps_per_epoch, decay_rate=decay_factor,
        warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=False, t_in_epochs=False,
    )  # fmt: skip


class HeadBank(nn.Module):
    """The heads as one module: ``forward(x)`` is the list of each head's (B, C) logits."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [h(x) for h in self.heads]


def train_heads(
    heads: nn.ModuleList,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    steps_per_epoch: int,
    scheduler: Scheduler,
    dist_info: DistInfo,
    on_epoch: Callable[[int, list[float]], None] = lambda epoch, losses: None,
    start_epoch: int = 0,
) -> None:
    """Train every head on ``batches(epoch)`` ((B, D) features, (B,) labels per step).

    The lrs are set per step by ``scheduler.step_update(step)`` (``build_scheduler``). Under
    torch.distributed the heads are wrapped in ``DistributedDataParallel``: gradients averaged
    over ranks (each rank its own batches); BatchNorm statistics are rank 0's on every rank
    (DDP broadcasts them; rank 0's are the ones saved and reported).
    ``on_epoch(epoch, mean loss per head)`` is called after each epoch. ``start_epoch``: the
    number of epochs already done (a resumed run; heads and optimizer already restored).
    """
    criterion = nn.CrossEntropyLoss()
    step = start_epoch * steps_per_epoch
    bank: nn.Module = HeadBank(heads)
    if dist_info.distributed:
        device_ids = [dist_info.device] if dist_info.device.type == "cuda" else None
        bank = DistributedDataParallel(bank, device_ids=device_ids)
    heads.train()
    for epoch in range(start_epoch, epochs):
        sums = torch.zeros(len(heads), dtype=torch.float64)
        count = 0
        bar = progress(batches(epoch), f"linear heads epoch {epoch + 1}/{epochs}", steps_per_epoch,
                       dist_info.is_main)  # fmt: skip
        for feats, labels in bar:
            scheduler.step_update(step)
            losses = torch.stack([criterion(logits, labels) for logits in bank(feats)])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            sums += losses.detach().double().cpu()
            count += 1
            step += 1
            bar.set(loss=float(losses.detach().min()))
        on_epoch(epoch, (sums / max(count, 1)).tolist())
    heads.eval()


def diverged_heads(heads: nn.ModuleList, last_losses: Optional[Sequence[float]]) -> list[bool]:
    """Per head: True when its last epoch's mean training loss (``last_losses``, None when no
    epoch ran in this process) or any of its parameters or buffers is not finite."""
    out = []
    for i, head in enumerate(heads):
        tensors = [*head.parameters(), *head.buffers()]
        finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        loss_ok = last_losses is None or bool(np.isfinite(last_losses[i]))
        out.append(not (finite and loss_ok))
    return out


@torch.no_grad()
def evaluate_heads(
    heads: nn.ModuleList,
    feats: np.ndarray,
    labels: np.ndarray,
    rows: Optional[np.ndarray] = None,
    batch_size: int = 4096,
) -> list[dict]:
    """``{1: top-1 %, 5: top-5 %}`` of each head on (N, D) features and (N,) labels.

    ``feats`` may be a memory-mapped feature cache: ``batch_size`` rows (of ``rows``, default
    all) are read at a time and moved to the heads' device, so nothing else is held in memory.
    """
    heads.eval()
    device = next(heads.parameters()).device
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    hits = [{1: 0, 5: 0} for _ in heads]
    for start in range(0, len(rows), batch_size):
        r = rows[start : start + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(feats[r])).to(device)
        y = torch.from_numpy(np.asarray(labels[r])).to(device)
        for total, h in zip(hits, heads):
            for k, n in topk_hits(h(x), y, (1, 5)).items():
                total[k] += n
    return [{k: 100.0 * n / max(len(rows), 1) for k, n in h.items()} for h in hits]
