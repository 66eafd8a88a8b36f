"""``main_finetuning.py``: build what a finetuning config names, train, evaluate, write results.

Run folder (``logging.folder``): ``config.yaml``, ``log.jsonl``, ``tensorboard/``,
``checkpoint-last.pth`` (every epoch, and every ``finetune.checkpoint_every`` steps),
``checkpoint-best.pth`` (best top-1 so far: weights only) and ``results.json``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from ..config import ConfigError, config_parser, parse_config, require, save_config, to_dict
from ..data.digits import build_digits_imagefolder
from ..data.folder import SafeImageFolder, collate_skip_none
from ..data.sampler import ShardSampler
from ..data.subsets import SubsetError, subset_of
from ..data.transforms import eval_transform
from ..engine.distributed import DistInfo, barrier, cleanup, init_distributed
from ..engine.logger import RunLogger, setup_console_logging, write_results
from ..engine.resume import LAST, load_training_state, save_training_state, unwrap
from ..engine.utils import seed_everything
from ..models.heads import POOLS
from . import recipe
from .config import FinetuneConfig
from .engine import StepOptions, TrainState, evaluate, train_one_epoch

logger = logging.getLogger("ijepa_toolkit")
BEST = "checkpoint-best.pth"
MIXUP_MODES = ("batch", "pair", "elem")


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse settings that would fail late or silently; each error names the key."""
    d, o, ft = cfg.data, cfg.optimization, cfg.finetune
    if not d.digits_root and not (d.train_root and d.val_root):
        raise ConfigError("set data.train_root and data.val_root (ImageFolder roots)")
    m = cfg.mixup
    require([
        ("data.batch_size", d.batch_size, d.batch_size >= 1, ">= 1"),
        ("optimization.accum_iter", o.accum_iter, o.accum_iter >= 1, ">= 1"),
        ("data.on_error", d.on_error, d.on_error in ("skip", "raise"), "'skip' or 'raise'"),
        ("finetune.pool", ft.pool, ft.pool in POOLS, f"one of {tuple(POOLS)}"),
        ("mixup.mode", m.mode, m.mode in MIXUP_MODES, f"one of {MIXUP_MODES} (timm Mixup)"),
        ("mixup.smoothing", m.smoothing, 0 <= m.smoothing < 1, "in [0, 1)"),
        ("optimization.layer_decay", o.layer_decay, 0 < o.layer_decay <= 1, "in (0, 1]"),
        ("optimization.epochs", o.epochs, o.epochs >= 1, ">= 1"),
        ("finetune.drop_path", ft.drop_path, 0 <= ft.drop_path < 1, "in [0, 1)"),
    ])  # fmt: skip
    if recipe.mixup_active(cfg.mixup) and d.batch_size % 2:
        raise ConfigError(
            f"data.batch_size={d.batch_size} is odd, but Mixup/CutMix pair images within each "
            "per-device batch: use an even batch size or set mixup.mixup=0 mixup.cutmix=0"
        )


def _roots(cfg: FinetuneConfig, dist: DistInfo) -> tuple[Path, Path]:
    d = cfg.data
    if not d.digits_root:
        return Path(d.train_root), Path(d.val_root)
    if dist.is_main:
        build_digits_imagefolder(d.digits_root, size=d.img_size, per_class=d.digits_per_class)
    barrier()
    return build_digits_imagefolder(d.digits_root, size=d.img_size, per_class=d.digits_per_class)


def _loader(ds, batch_size: int, sampler: ShardSampler, cfg: FinetuneConfig, train: bool):
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_mem and torch.cuda.is_available(),
        drop_last=train,
        collate_fn=collate_skip_none,
        generator=torch.Generator(),
    )


def _amp_dtype(cfg: FinetuneConfig, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":
        return None
    if cfg.finetune.use_fp16:
        return torch.float16
    return torch.bfloat16 if cfg.meta.use_bfloat16 else None


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Parse ``--fname cfg.yaml [--resume] [--eval [CKPT]] key=value ...`` and run; returns the
    final metrics. Bad input exits with status 2 and one ``error:`` line."""
    parser = config_parser("MAE-recipe finetuning of an I-JEPA encoder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from logging.folder/checkpoint-last.pth if it exists",
    )
    parser.add_argument(
        "--eval",
        nargs="?",
        const="",
        default=None,
        metavar="CKPT",
        help="only evaluate CKPT (default: logging.folder/checkpoint-best.pth)",
    )
    cfg, args = parse_config(FinetuneConfig, parser, argv)
    try:
        check_config(cfg)
        return run(cfg, resume=args.resume, eval_ckpt=args.eval)
    except (ConfigError, CheckpointError, SubsetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        cleanup()


def run(cfg: FinetuneConfig, resume: bool = False, eval_ckpt: Optional[str] = None) -> dict:
    """Finetune (or, with ``eval_ckpt``, only evaluate) as ``cfg`` says; returns final metrics."""
    dist = init_distributed(cfg.meta.device)
    setup_console_logging(dist.is_main)
    seed_everything(cfg.meta.seed, dist.rank)
    device, d, o, ft = dist.device, cfg.data, cfg.optimization, cfg.finetune
    folder = Path(cfg.logging.folder)

    train_root, val_root = _roots(cfg, dist)
    train_ds = SafeImageFolder(train_root, recipe.train_transform(d), on_error=d.on_error)
    val_ds = SafeImageFolder(
        val_root, eval_transform(d.img_size, d.crop_ratio, d.mean, d.std), on_error=d.on_error
    )
    if train_ds.classes != val_ds.classes:
        raise ConfigError(f"{train_root} and {val_root} have different class folders")
    num_classes = len(train_ds.classes)
    subset = subset_of(train_ds, cfg.subset)
    if subset is not None:  # low-shot finetuning: 1percent.txt or N images per class
        train_ds = Subset(train_ds, subset)
    train_sampler = ShardSampler(len(train_ds), dist.rank, dist.world_size, True, cfg.meta.seed)
    val_sampler = ShardSampler(len(val_ds), dist.rank, dist.world_size)
    train_loader = _loader(train_ds, d.batch_size, train_sampler, cfg, train=True)
    val_loader = _loader(val_ds, ft.eval_batch_size or 2 * d.batch_size, val_sampler, cfg, False)
    steps_per_epoch = len(train_loader) // o.accum_iter
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{train_root}: {len(train_ds)} images make no full step of data.batch_size="
            f"{d.batch_size} x accum_iter={o.accum_iter} x {dist.world_size} processes"
        )

    model = recipe.build_classifier(cfg, num_classes).to(device)
    amp_dtype = _amp_dtype(cfg, device)
    if dist.is_main:
        save_config(cfg, folder)
    if eval_ckpt is not None:
        return _evaluate_only(
            model, eval_ckpt or str(folder / BEST), val_loader, device, amp_dtype, folder, dist
        )

    effective_batch = d.batch_size * o.accum_iter * dist.world_size
    lr = recipe.absolute_lr(o, effective_batch)
    optimizer = recipe.build_optimizer(recipe.param_groups(model, o), o, lr)
    scheduler = recipe.build_scheduler(optimizer, o, steps_per_epoch, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = None
    if ft.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=ft.model_ema_decay)
    logger.info(
        "%d classes, %d train / %d val images; effective batch %d, lr %.3e, %d steps per epoch",
        num_classes,
        len(train_ds),
        len(val_ds),
        effective_batch,
        lr,
        steps_per_epoch,
    )
    logger.info("parameter groups:\n%s", recipe.group_table(model, optimizer, lr))

    run_log = RunLogger(folder, enabled=dist.is_main, tensorboard=cfg.logging.tensorboard)
    state = TrainState()
    if resume:
        run_log.skip_logged()
        if (folder / LAST).is_file():
            obj = load_training_state(folder / LAST, model, optimizer, scaler, rank=dist.rank)
            state = TrainState(obj["epoch"], obj["step"], obj["batch"], obj["best_top1"])
            if ema is not None and obj.get("model_ema") is not None:
                ema.module.load_state_dict(obj["model_ema"])
        else:
            logger.warning("--resume: no %s in %s; starting from scratch", LAST, folder)
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None
        )

    def save_last() -> None:
        save_training_state(
            folder / LAST,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            epoch=state.epoch,
            step=state.step,
            is_main=dist.is_main,
            batch=state.batch,
            best_top1=state.best_top1,
            model_ema=ema.module.state_dict() if ema is not None else None,
            config=to_dict(cfg),
        )

    opts = StepOptions(
        device=device,
        accum_iter=o.accum_iter,
        clip_grad=o.clip_grad,
        amp_dtype=amp_dtype,
        scaler=scaler,
        mixup=recipe.build_mixup(cfg.mixup, num_classes),
        ema=ema,
        log_freq=cfg.logging.log_freq,
        checkpoint_every=ft.checkpoint_every,
        steps_per_epoch=steps_per_epoch,
    )
    criterion = recipe.build_criterion(cfg.mixup)
    metrics = None
    for epoch in range(state.epoch, o.epochs):
        train_sampler.set_epoch(epoch, start=state.batch * d.batch_size)
        train_loader.generator.manual_seed(cfg.meta.seed * 100003 + epoch * 1009 + dist.rank)
        train = train_one_epoch(
            model,
            criterion,
            train_loader,
            optimizer,
            scheduler,
            state,
            opts,
            run_log,
            save=save_last,
        )
        state.epoch, state.batch = epoch + 1, 0
        metrics = evaluate(model, val_loader, device, amp_dtype)
        row = {f"val_{k}": v for k, v in metrics.items()}
        if ema is not None:
            row.update(
                {
                    f"ema_{k}": v
                    for k, v in evaluate(ema.module, val_loader, device, amp_dtype).items()
                }
            )
        run_log.log(
            step=state.step,
            epoch=state.epoch,
            train_loss=train["loss"],
            train_skipped=train["skipped"],
            train_overflow_skipped=train["overflow"],
            **row,
        )
        logger.info(
            "epoch %d: train loss %.4f, val acc@1 %.2f acc@5 %.2f (%d images, %d skipped)",
            state.epoch,
            train["loss"],
            metrics["acc1"],
            metrics["acc5"],
            metrics["images"],
            metrics["skipped"] + train["skipped"],
        )
        if metrics["acc1"] > state.best_top1:
            state.best_top1 = metrics["acc1"]
            if dist.is_main:
                save_checkpoint(
                    {
                        "model": unwrap(model).state_dict(),
                        "epoch": state.epoch,
                        "metrics": metrics,
                        "config": to_dict(cfg),
                    },
                    folder / BEST,
                )
        save_last()
    if metrics is None:  # resumed a finished run
        metrics = evaluate(model, val_loader, device, amp_dtype)
    run_log.close()
    if dist.is_main:
        write_results(
            folder,
            "finetune",
            {"top1": metrics["acc1"], "top5": metrics["acc5"]},
            best_top1=state.best_top1,
            epochs=state.epoch,
            steps=state.step,
            train_images=len(train_ds),
            val_images=metrics["images"],
            val_skipped=metrics["skipped"],
            checkpoint=str(folder / LAST),
            encoder=cfg.model.checkpoint or "random init",
        )
    return metrics


def _evaluate_only(
    model, ckpt: str, val_loader, device, amp_dtype, folder: Path, dist: DistInfo
) -> dict:
    """Load a finetuned ``{"model": ...}`` checkpoint strictly and evaluate it."""
    obj = read_checkpoint(ckpt)
    try:
        model.load_state_dict(obj["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: not a finetuned checkpoint of this model ({e})") from None
    metrics = evaluate(model, val_loader, device, amp_dtype)
    logger.info(
        "%s: acc@1 %.2f acc@5 %.2f on %d images",
        ckpt,
        metrics["acc1"],
        metrics["acc5"],
        metrics["images"],
    )
    if dist.is_main:
        write_results(
            folder,
            "finetune",
            {"top1": metrics["acc1"], "top5": metrics["acc5"]},
            val_images=metrics["images"],
            checkpoint=ckpt,
            eval_only=True,
        )
    return metrics
