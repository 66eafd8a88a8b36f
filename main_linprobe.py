"""Linear probes on frozen features: one head per (learning rate, weight decay), all trained in
one pass (DINOv2 style), the reported head picked on a held-out part of the training set.

    python main_linprobe.py --fname configs/linprobe/digits.yaml [section.key=value ...]
    python main_linprobe.py --fname ... linprobe.mode=online   # images + augmentation each step
    python main_linprobe.py --fname ... --resume   # continue from logging.folder's checkpoint
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

from ijepa_toolkit.build import build_encoder
from ijepa_toolkit.config import (
    EncoderSection,
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
    require,
)
from ijepa_toolkit.data.folder import SafeImageFolder, collate_skip_none
from ijepa_toolkit.engine.logger import RunLogger
from ijepa_toolkit.engine.resume import LAST, load_training_state, save_training_state
from ijepa_toolkit.engine.utils import autocast, seed_everything
from ijepa_toolkit.eval.features import LAYERS, EvalDataSection, FeaturesSection
from ijepa_toolkit.eval.frozen import (
    check_same_classes,
    finish_run,
    run_cli,
    split_features,
    start_run,
)
from ijepa_toolkit.eval.linear import (
    OPTIMIZERS,
    SCHEDULES,
    build_scheduler,
    evaluate_heads,
    make_heads,
    make_optimizer,
    train_heads,
)
from ijepa_toolkit.eval.logistic import held_out_split
from ijepa_toolkit.models.heads import pooled_features

logger = logging.getLogger("ijepa_toolkit")


@dataclass
class LinprobeSection:
    mode: str = "cached"  # cached: cached eval-transform features | online: augmented images
    batchnorm: bool = True  # BatchNorm1d(affine=False) before the linear layer (MAE)
    held_out_fraction: float = 0.1  # of each training class, to pick the learning rate


@dataclass
class OptimizationSection:
    optimizer: str = "lars"  # lars (MAE) | sgd
    base_lrs: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    )  # lr = base_lr * global batch / 256
    weight_decays: list[float] = dataclasses.field(default_factory=lambda: [0.0])  # grid
    batch_size: int = 256  # per rank
    epochs: int = 90
    warmup_epochs: float = 10.0
    schedule: str = "cosine"  # cosine (MAE) | step (I-JEPA / VISSL)
    decay_epochs: int = 15  # step: lr x decay_factor every decay_epochs epochs
    decay_factor: float = 0.1
    momentum: float = 0.9


@dataclass
class LinprobeConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: EvalDataSection = dataclasses.field(default_factory=EvalDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    linprobe: LinprobeSection = dataclasses.field(default_factory=LinprobeSection)
    optimization: OptimizationSection = dataclasses.field(default_factory=OptimizationSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


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


def online_batches(cfg: LinprobeConfig, indices: list, dist_info):
    """``batches(epoch)`` of frozen-encoder features of augmented training images (MAE linprobe
    augmentation: RandomResizedCrop bicubic + horizontal flip)."""
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
                        num_workers=d.num_workers, collate_fn=collate_skip_none,
                        drop_last=len(sampler) >= cfg.optimization.batch_size)  # fmt: skip
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
                feats = pooled_features(encoder, images.to(dist_info.device), pool)
            yield feats.float(), labels.to(dist_info.device)

    return batches, len(loader)


def run(cfg: LinprobeConfig, resume: bool = False) -> None:
    opt, lp = cfg.optimization, cfg.linprobe
    mode = {"cached": "cached eval-transform features",
            "online": "online: RandomResizedCrop + flip each step"}  # fmt: skip
    if lp.mode not in mode:
        raise ValueError(f"linprobe.mode must be one of {list(mode)}, got {lp.mode!r}")
    require([
        ("optimization.optimizer", opt.optimizer, opt.optimizer in OPTIMIZERS,
         f"one of {OPTIMIZERS}"),
        ("optimization.schedule", opt.schedule, opt.schedule in SCHEDULES, f"one of {SCHEDULES}"),
        ("optimization.base_lrs", opt.base_lrs, bool(opt.base_lrs) and min(opt.base_lrs) > 0,
         "a non-empty list of values > 0"),
        ("optimization.weight_decays", opt.weight_decays,
         bool(opt.weight_decays) and min(opt.weight_decays) >= 0,
         "a non-empty list of values >= 0"),
        ("optimization.epochs", opt.epochs, opt.epochs >= 1, ">= 1"),
        ("linprobe.held_out_fraction", lp.held_out_fraction, 0 < lp.held_out_fraction < 1,
         "between 0 and 1"),
    ])  # fmt: skip
    settings = {
        "mode": mode[lp.mode], "head": ("BatchNorm1d(affine=False) + " if lp.batchnorm else "")
        + "Linear", "optimizer": opt.optimizer, "base_lrs": opt.base_lrs,
        "lr_rule": "base_lr * global_batch / 256", "schedule": schedule_text(opt),
        "epochs": opt.epochs, "warmup_epochs": opt.warmup_epochs, "momentum": opt.momentum,
        "weight_decays": opt.weight_decays, "layers": cfg.features.layers,
        "selection": f"held-out {lp.held_out_fraction:g} of each training class",
    }  # fmt: skip
    dist_info = start_run(cfg, "linprobe", settings)
    dev, world = dist_info.device, dist_info.world_size
    test = split_features(cfg, cfg.data.val_folder, dist_info)
    if lp.mode == "cached":
        train = split_features(cfg, cfg.data.train_folder, dist_info)
        fit_idx, held_idx = held_out_split(train.labels, lp.held_out_fraction, cfg.meta.seed)
        batches, steps = cached_batches(train.feats, train.labels, fit_idx, opt.batch_size,
                                        cfg.meta.seed, dist_info.rank, world, dev)  # fmt: skip
    else:
        targets = np.asarray(SafeImageFolder(cfg.data.train_folder).targets)
        fit_idx, held_idx = held_out_split(targets, lp.held_out_fraction, cfg.meta.seed)
        train = split_features(cfg, cfg.data.train_folder, dist_info, held_idx.tolist())
        held_idx = np.arange(len(train.labels))  # the held-out images are all of this cache
        batches, steps = online_batches(cfg, fit_idx.tolist(), dist_info)
    check_same_classes(train, test)
    grid = [
        (b * opt.batch_size * world / 256, wd) for b in opt.base_lrs for wd in opt.weight_decays
    ]
    names = [f"lr{lr:g}_wd{wd:g}" for lr, wd in grid]
    seed_everything(cfg.meta.seed)  # heads start alike on every rank, cache hit or miss
    heads = make_heads(test.feats.shape[1], len(test.classes), len(grid), lp.batchnorm).to(dev)
    optimizer = make_optimizer(heads, grid, opt.optimizer, opt.momentum)
    scheduler = build_scheduler(optimizer, opt.schedule, opt.epochs, steps, opt.warmup_epochs,
                                opt.decay_epochs, opt.decay_factor)  # fmt: skip
    run_log = RunLogger(cfg.logging.folder, dist_info.is_main, cfg.logging.tensorboard)
    last, start_epoch = Path(cfg.logging.folder) / LAST, 0
    if resume:
        run_log.skip_logged()
        if last.is_file():
            start_epoch = int(
                load_training_state(last, heads, optimizer, rank=dist_info.rank)["epoch"]
            )
        else:
            logger.warning("--resume: no %s; starting from scratch", last)

    def on_epoch(epoch: int, losses: list) -> None:
        run_log.log(step=epoch, **{f"loss/{n}": v for n, v in zip(names, losses)})
        save_training_state(last, model=heads, optimizer=optimizer, epoch=epoch + 1,
                            step=(epoch + 1) * steps, is_main=dist_info.is_main)  # fmt: skip

    train_heads(heads, optimizer, batches, opt.epochs, steps, scheduler, dist_info, on_epoch,
                start_epoch)  # fmt: skip
    run_log.close()
    held = evaluate_heads(heads, train.feats, train.labels, held_idx)
    best = max(range(len(grid)), key=lambda i: (held[i][1], -i))
    acc = evaluate_heads(heads[best : best + 1], test.feats, test.labels)[0]
    settings.update(
        lrs=sorted({lr for lr, _ in grid}), global_batch=opt.batch_size * world,
        held_out_top1={n: h[1] for n, h in zip(names, held)}, lr_selected=grid[best][0],
        wd_selected=grid[best][1],
        n_fit=len(fit_idx), n_held_out=len(held_idx), n_test=len(test.labels),
        feature_cache=str(test.path.parent), cache_reused={"train": train.reused,
                                                            "test": test.reused},
    )  # fmt: skip
    finish_run(cfg, dist_info, "linprobe", {"top1": acc[1], "top5": acc[5]}, settings)


def main(argv=None) -> None:
    parser = config_parser(__doc__)
    parser.add_argument(
        "--resume", action="store_true", help="continue from logging.folder/checkpoint-last.pth"
    )
    cfg, args = parse_config(LinprobeConfig, parser, argv)
    run_cli(lambda: run(cfg, resume=args.resume))


if __name__ == "__main__":
    main()
