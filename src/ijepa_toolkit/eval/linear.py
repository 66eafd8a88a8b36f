"""Linear probes on frozen features: one head per (learning rate, weight decay), all trained in
one pass (DINOv2 style), the reported head picked on a held-out part of the training set.

    python -m ijepa_toolkit.eval.linear --fname linprobe/digits [section.key=value ...]
    ijepa-linprobe --fname ... linprobe.mode=online   # images + augmentation each step
    ijepa-linprobe --fname ... --resume   # continue from logging.folder's checkpoint

From Python: ``linear(encoder, train_folder, val_folder)`` (an encoder object) or
``linear_features(train_feats, train_labels, test_feats, test_labels)``. The heads, optimizer,
schedule and training loop are in ``linear_heads``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np

from ..config import EncoderSection, LoggingSection, MetaSection
from ..engine.distributed import DistInfo
from ..engine.logger import RunLogger
from ..engine.utils import autocast, loader_kwargs, seed_everything
from ..errors import TrainingDiverged
from ..run_folder import LINPROBE_RESUME_ALLOWED, add_run_flags, run_owned
from ..runs import check_finite
from .features import LAYERS, EvalDataSection, FeatureSet, FeaturesSection
from .frozen import (
    cache_settings,
    check_same_classes,
    encode_folders,
    finish_run,
    held_out_split,
    protocol_main,
    split_features,
    start_run,
)

if TYPE_CHECKING:  # torch, timm and the heads are imported when a run starts (not for --help)
    import torch
    from torch import nn

logger = logging.getLogger("ijepa_toolkit")
Optimizer = Literal["lars", "sgd"]
Schedule = Literal["cosine", "step"]
Batches = Callable[[int], Iterator[tuple]]  # epoch -> ((B, D) features, (B,) labels) tensors
MODES = {"cached": "cached eval-transform features",
         "online": "online: RandomResizedCrop + flip each step"}  # fmt: skip


@dataclass
class LinprobeSection:
    mode: Literal["cached", "online"] = "cached"  # online: augmented images through the encoder
    batchnorm: bool = True  # BatchNorm1d(affine=False) before the linear layer (MAE)
    held_out_fraction: float = 0.1  # of each training class, to pick the learning rate

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        frac = self.held_out_fraction
        return [("held_out_fraction", frac, 0 < frac < 1, "between 0 and 1")]


@dataclass
class OptimizationSection:
    optimizer: Optimizer = "lars"  # lars (MAE) | sgd
    base_lrs: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    )  # lr = base_lr * global batch / 256
    weight_decays: list[float] = dataclasses.field(default_factory=lambda: [0.0])  # grid
    batch_size: int = 256  # per rank
    epochs: int = 90
    warmup_epochs: float = 10.0
    schedule: Schedule = "cosine"  # cosine (MAE) | step (I-JEPA / VISSL)
    decay_epochs: int = 15  # step: lr x decay_factor every decay_epochs epochs
    decay_factor: float = 0.1
    momentum: float = 0.9

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lrs, wds = self.base_lrs, self.weight_decays
        return [
            ("base_lrs", lrs, bool(lrs) and min(lrs) > 0, "a non-empty list of values > 0"),
            ("weight_decays", wds, bool(wds) and min(wds) >= 0, "a non-empty list of values >= 0"),
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("decay_epochs", self.decay_epochs, self.decay_epochs >= 1, ">= 1"),
        ]

    def grid(self, world_size: int = 1) -> list[tuple[float, float]]:
        """(lr, weight decay) of each head: ``lr = base_lr * global batch / 256``."""
        scale = self.batch_size * world_size / 256
        return [(b * scale, wd) for b in self.base_lrs for wd in self.weight_decays]


@dataclass
class LinprobeConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: EvalDataSection = dataclasses.field(default_factory=EvalDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    linprobe: LinprobeSection = dataclasses.field(default_factory=LinprobeSection)
    optimization: OptimizationSection = dataclasses.field(default_factory=OptimizationSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def head_names(grid: Sequence[tuple[float, float]]) -> list[str]:
    return [f"lr{lr:g}_wd{wd:g}" for lr, wd in grid]


def schedule_text(opt: OptimizationSection) -> str:
    """The lr schedule in words, for the run's settings."""
    if opt.schedule == "step":
        return f"linear warmup + x{opt.decay_factor:g} every {opt.decay_epochs} epochs"
    return "linear warmup + cosine"


def cached_batches(feats: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int,
                   seed: int, rank: int, world: int, device: torch.device):  # fmt: skip
    """``batches(epoch)`` of (B, D) features and (B,) labels from ``rows`` of the (memory-mapped)
    cache: a seeded shuffle per epoch, this rank's equal share, full batches, each batch read
    from the cache and moved to ``device`` on its own (ranks share the page cache)."""
    import torch

    per_rank = len(rows) // world
    steps = max(1, per_rank // batch_size)

    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        mine = torch.randperm(len(rows), generator=g)[rank * per_rank : (rank + 1) * per_rank]
        for i in range(steps):
            idx = rows[mine[i * batch_size : (i + 1) * batch_size].numpy()]
            yield (torch.from_numpy(np.ascontiguousarray(feats[idx])).to(device),
                   torch.from_numpy(labels[idx]).to(device))  # fmt: skip

    return batches, steps


def online_batches(cfg: LinprobeConfig, indices: list, dist_info: DistInfo) -> tuple[Batches, int]:
    """``batches(epoch)`` of frozen-encoder features of augmented training images (MAE linprobe
    augmentation: RandomResizedCrop bicubic + horizontal flip)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import transforms

    from ..build import build_encoder
    from ..data.folder import SafeImageFolder, collate_skip_none
    from ..models.heads import pooled_features

    d = cfg.data
    bicubic = transforms.InterpolationMode.BICUBIC
    tf = transforms.Compose([
        transforms.RandomResizedCrop(d.img_size, interpolation=bicubic),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(d.mean, d.std),
    ])  # fmt: skip
    ds = torch.utils.data.Subset(SafeImageFolder(d.train_folder, transform=tf), indices)
    sampler = DistributedSampler(ds, dist_info.world_size, dist_info.rank, seed=cfg.meta.seed,
                                 drop_last=True)  # fmt: skip
    loader = DataLoader(ds, batch_size=cfg.optimization.batch_size, sampler=sampler,
                        collate_fn=collate_skip_none,
                        drop_last=len(sampler) >= cfg.optimization.batch_size,
                        **loader_kwargs(d.num_workers, dist_info.device))  # fmt: skip
    torch.manual_seed(cfg.meta.seed)
    encoder = build_encoder(cfg.model).to(dist_info.device).eval()
    pool = LAYERS[cfg.features.layers]

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        for batch in loader:
            if batch is None:
                continue
            images, labels = batch
            with torch.no_grad(), autocast(dist_info.device, cfg.meta.use_bfloat16):
                feats = pooled_features(encoder, images.to(dist_info.device, non_blocking=True),
                                        pool)  # fmt: skip
            yield feats.float(), labels.to(dist_info.device)

    return batches, len(loader)


def new_heads(
    opt: OptimizationSection, in_dim: int, num_classes: int, batchnorm: bool, steps: int,
    world_size: int, seed: int, device: torch.device,
) -> tuple[nn.ModuleList, torch.optim.Optimizer, Any]:  # fmt: skip
    """Seeded heads of the (lr, wd) grid (alike on every rank), their optimizer and schedule."""
    from .linear_heads import build_scheduler, make_heads, make_optimizer

    grid = opt.grid(world_size)
    seed_everything(seed)  # heads start alike on every rank, cache hit or miss
    heads = make_heads(in_dim, num_classes, len(grid), batchnorm).to(device)
    optimizer = make_optimizer(heads, grid, opt.optimizer, opt.momentum)
    scheduler = build_scheduler(optimizer, opt.schedule, opt.epochs, steps, opt.warmup_epochs,
                                opt.decay_epochs, opt.decay_factor)  # fmt: skip
    return heads, optimizer, scheduler


def select_and_test(
    heads: nn.ModuleList, grid: Sequence[tuple[float, float]], held: FeatureSet,
    held_rows: np.ndarray, test: FeatureSet, diverged: Optional[Sequence[bool]] = None,
) -> tuple[dict[str, float], dict]:  # fmt: skip
    """(test ``{"top1", "top5"}`` % of the head best on the held-out rows of ``held``, the
    selection: held-out top-1 of every head, the selected lr and weight decay, the diverged
    heads). A diverged head (``diverged[i]``: non-finite loss or weights) is never selected, even
    on a held-out tie; all of them diverged: ``TrainingDiverged``."""
    from .linear_heads import evaluate_heads

    names, diverged = head_names(grid), list(diverged or [False] * len(grid))
    if all(diverged):
        raise TrainingDiverged(f"linear probe: every head diverged (non-finite loss or weights: "
                               f"{', '.join(names)}); lower optimization.base_lrs")  # fmt: skip
    held_acc = evaluate_heads(heads, held.feats, held.labels, held_rows)
    ok = [i for i in range(len(grid)) if not diverged[i]]
    best = max(ok, key=lambda i: (held_acc[i][1], -i))
    acc = evaluate_heads(heads[best : best + 1], test.feats, test.labels)[0]
    selection = {
        "held_out_top1": {n: h[1] for n, h in zip(names, held_acc)},
        "lr_selected": grid[best][0], "wd_selected": grid[best][1],
        "diverged_heads": [n for n, d in zip(names, diverged) if d],
    }  # fmt: skip
    return {"top1": acc[1], "top5": acc[5]}, selection


def small_data_warnings(n_fit: int, world_size: int, steps: int, opt: OptimizationSection,
                        diverged: Sequence[str]) -> list[str]:  # fmt: skip
    """Warnings (also logged) for a probe whose fit rows per rank are fewer than a batch (one
    short step per epoch: the lr rule assumes full batches) or whose heads diverged."""
    warnings = []
    if n_fit // world_size < opt.batch_size:
        warnings.append(
            f"linear probe: {n_fit} fit images ({n_fit // world_size} per rank) < "
            f"optimization.batch_size={opt.batch_size}: {steps} step(s) per epoch, "
            f"{steps * opt.epochs} in all, on batches smaller than the lr rule (base_lr * "
            "global batch / 256) assumes"
        )  # fmt: skip
    if diverged:
        warnings.append(f"linear probe: diverged heads not selectable: {', '.join(diverged)}")
    for w in warnings:
        logger.warning(w)
    return warnings


def linear_features(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    opt: Optional[OptimizationSection] = None,
    batchnorm: bool = True,
    held_out_fraction: float = 0.1,
    seed: int = 0,
    device: Optional[torch.device] = None,
) -> tuple[dict[str, float], dict]:
    """The linear probe protocol in one process on (N, D) features and (N,) labels: (test
    ``{"top1", "top5"}`` %, the selection, see ``select_and_test``). ``opt``: the grid and
    schedule (default ``OptimizationSection()``)."""
    import torch

    from .linear_heads import diverged_heads, train_heads

    opt, device = opt or OptimizationSection(), device or torch.device("cpu")
    train = FeatureSet(np.asarray(train_feats), np.asarray(train_labels), [])
    test = FeatureSet(np.asarray(test_feats), np.asarray(test_labels), [])
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    fit_idx, held_idx = held_out_split(train.labels, held_out_fraction, seed)
    batches, steps = cached_batches(train.feats, train.labels, fit_idx, opt.batch_size, seed, 0,
                                    1, device)  # fmt: skip
    heads, optimizer, scheduler = new_heads(opt, train.feats.shape[1], num_classes, batchnorm,
                                            steps, 1, seed, device)  # fmt: skip
    losses: list = []
    train_heads(heads, optimizer, batches, opt.epochs, steps, scheduler, DistInfo(device=device),
                lambda epoch, epoch_losses: losses.append(epoch_losses))  # fmt: skip
    metrics, selection = select_and_test(heads, opt.grid(), train, held_idx, test,
                                         diverged_heads(heads, losses[-1]))  # fmt: skip
    selection.update(steps_per_epoch=steps, warnings=small_data_warnings(
        len(fit_idx), 1, steps, opt, selection["diverged_heads"]))  # fmt: skip
    return metrics, selection


def linear(
    encoder: torch.nn.Module,
    train_folder: str,
    val_folder: str,
    opt: Optional[OptimizationSection] = None,
    layers: str = "last",
    seed: int = 0,
    **data_options: Any,
) -> tuple[dict[str, float], dict]:
    """``linear_features`` of ``encoder``'s features of two image folders (no cache);
    ``data_options``: ``EvalDataSection`` fields (transform, batch size)."""
    train, test = encode_folders(encoder, train_folder, val_folder, layers, data_options)
    device = next(encoder.parameters()).device
    return linear_features(train.feats, train.labels, test.feats, test.labels, opt, seed=seed,
                           device=device)  # fmt: skip


def training_data(cfg: LinprobeConfig, dist_info: DistInfo):
    """(held-out FeatureSet, its held-out rows, number of fit images, batches, steps per epoch)
    of ``linprobe.mode``: cached features of the fit rows, or augmented fit images (online;
    the held-out images are then a cache of their own)."""
    from ..data.folder import SafeImageFolder

    opt, frac, seed = cfg.optimization, cfg.linprobe.held_out_fraction, cfg.meta.seed
    if cfg.linprobe.mode == "cached":
        train = split_features(cfg, cfg.data.train_folder, dist_info)
        fit_idx, held_idx = held_out_split(train.labels, frac, seed)
        batches, steps = cached_batches(
            train.feats, train.labels, fit_idx, opt.batch_size, seed, dist_info.rank,
            dist_info.world_size, dist_info.device,
        )  # fmt: skip
        return train, held_idx, len(fit_idx), batches, steps
    targets = np.asarray(SafeImageFolder(cfg.data.train_folder).targets)
    fit_idx, held_idx = held_out_split(targets, frac, seed)
    held = split_features(cfg, cfg.data.train_folder, dist_info, held_idx.tolist())
    batches, steps = online_batches(cfg, fit_idx.tolist(), dist_info)
    return held, np.arange(len(held.labels)), len(fit_idx), batches, steps


def train_logged(
    cfg: LinprobeConfig, dist_info: DistInfo, test: FeatureSet, batches: Batches, steps: int,
    resume: bool,
) -> tuple[nn.ModuleList, Optional[list[float]]]:  # fmt: skip
    """(the heads trained on ``batches``, each epoch logged and checkpointed in logging.folder,
    the last epoch's mean loss per head: None when no epoch ran, a finished run resumed);
    ``resume``: continue from that checkpoint."""
    from ..engine.resume import LAST, load_training_state, save_training_state
    from .linear_heads import train_heads

    opt = cfg.optimization
    heads, optimizer, scheduler = new_heads(
        opt, test.feats.shape[1], len(test.classes), cfg.linprobe.batchnorm, steps,
        dist_info.world_size, cfg.meta.seed, dist_info.device,
    )  # fmt: skip
    names = head_names(opt.grid(dist_info.world_size))
    run_log = RunLogger(cfg.logging.folder, dist_info.is_main, cfg.logging.tensorboard)
    last, start_epoch = Path(cfg.logging.folder) / LAST, 0
    if resume:
        if last.is_file():
            state = load_training_state(last, heads, optimizer, rank=dist_info.rank)
            start_epoch = int(state["epoch"])
        else:
            logger.warning("--resume: no %s; starting from scratch", last)
        run_log.resumed_at(start_epoch - 1)  # rows of later epochs: superseded (read_jsonl)

    last_losses: list = [None]

    def on_epoch(epoch: int, losses: list) -> None:
        if not any(math.isfinite(v) for v in losses):  # before this epoch's state is saved
            check_finite(losses[0], f"epoch {epoch} in every head", last)
        last_losses[0] = losses
        run_log.log(step=epoch, **{f"loss/{n}": v for n, v in zip(names, losses)})
        save_training_state(last, model=heads, optimizer=optimizer, epoch=epoch + 1,
                            step=(epoch + 1) * steps, is_main=dist_info.is_main)  # fmt: skip

    train_heads(heads, optimizer, batches, opt.epochs, steps, scheduler, dist_info, on_epoch,
                start_epoch)  # fmt: skip
    run_log.close()
    return heads, last_losses[0]


def run(cfg: LinprobeConfig, resume: bool = False) -> dict[str, float]:
    """The linear probe protocol of ``cfg``; writes the run folder, returns the metrics."""
    opt, lp = cfg.optimization, cfg.linprobe
    settings = {
        "mode": MODES[lp.mode], "head": ("BatchNorm1d(affine=False) + " if lp.batchnorm else "")
        + "Linear", "optimizer": opt.optimizer, "base_lrs": opt.base_lrs,
        "lr_rule": "base_lr * global_batch / 256", "schedule": schedule_text(opt),
        "epochs": opt.epochs, "warmup_epochs": opt.warmup_epochs, "momentum": opt.momentum,
        "weight_decays": opt.weight_decays, "layers": cfg.features.layers,
        "selection": f"held-out {lp.held_out_fraction:g} of each training class",
    }  # fmt: skip
    dist_info = start_run(cfg, "linprobe", settings)
    from .linear_heads import diverged_heads  # torch, timm: after the cheap checks

    test = split_features(cfg, cfg.data.val_folder, dist_info)
    held, held_rows, n_fit, batches, steps = training_data(cfg, dist_info)
    check_same_classes(held, test)
    heads, last_losses = train_logged(cfg, dist_info, test, batches, steps, resume)
    grid = opt.grid(dist_info.world_size)
    metrics, selection = select_and_test(heads, grid, held, held_rows, test,
                                         diverged_heads(heads, last_losses))  # fmt: skip
    warnings = small_data_warnings(n_fit, dist_info.world_size, steps, opt,
                                   selection["diverged_heads"])  # fmt: skip
    settings.update(steps_per_epoch=steps, warnings=warnings)
    settings.update(
        lrs=sorted({lr for lr, _ in grid}), global_batch=opt.batch_size * dist_info.world_size,
        **selection, n_fit=n_fit, n_held_out=len(held_rows), n_test=len(test.labels),
        **cache_settings(("test", test), ("train", held)),
    )  # fmt: skip
    finish_run(cfg, dist_info, "linprobe", metrics, settings)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.eval.linear --fname linprobe/digits [--resume] [key=value]``."""

    def work(cfg: LinprobeConfig, args) -> dict[str, float]:  # owning logging.folder
        return run_owned(cfg, args, LINPROBE_RESUME_ALLOWED, lambda: run(cfg, args.resume))

    return protocol_main(LinprobeConfig, __doc__, work, argv, add_run_flags)


if __name__ == "__main__":
    raise SystemExit(main())
