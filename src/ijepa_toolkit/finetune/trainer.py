"""The finetuning run's machinery (``run.run`` imports it when work starts): datasets and
sharded loaders, the ``Finetuner`` (optimizer, schedule, scaler, EMA, checkpoints, run log),
training and evaluation-only runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..config import save_config, to_dict
from ..data.digits import build_digits_imagefolder
from ..data.folder import SafeImageFolder, collate_skip_none
from ..data.sampler import ShardSampler
from ..data.subsets import subset_of
from ..data.transforms import eval_transform
from ..engine.distributed import DistInfo, barrier, init_distributed
from ..engine.logger import RunLogger, setup_console_logging
from ..engine.resume import LAST, load_training_state, save_training_state, unwrap
from ..engine.utils import amp_dtype, grad_scaler, loader_kwargs, maybe_compile, seed_everything
from ..errors import CheckpointError, ConfigError
from ..io.read import read_checkpoint
from ..io.save import save_checkpoint
from ..run_folder import RunFolder
from ..runs import write_results
from . import recipe
from .config import FinetuneConfig
from .engine import StepOptions, TrainState, evaluate, train_one_epoch

logger = logging.getLogger("ijepa_toolkit")
BEST = "checkpoint-best.pth"


@dataclass
class Data:
    """The datasets and loaders of one run."""

    train: torch.utils.data.Dataset
    val: SafeImageFolder
    sampler: ShardSampler  # of the training loader
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    steps_per_epoch: int


def _folders(cfg: FinetuneConfig, dist: DistInfo) -> tuple[Path, Path]:
    d = cfg.data
    if not d.digits_root:
        return Path(d.train_folder), Path(d.val_folder)
    if dist.is_main:
        build_digits_imagefolder(d.digits_root, size=d.img_size, per_class=d.digits_per_class)
    barrier()
    return build_digits_imagefolder(d.digits_root, size=d.img_size, per_class=d.digits_per_class)


def _loader(ds, batch_size: int, sampler: ShardSampler, cfg: FinetuneConfig, train: bool,
            device: torch.device):  # fmt: skip
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, drop_last=train,
        collate_fn=collate_skip_none, generator=torch.Generator(),
        **loader_kwargs(cfg.data.num_workers, device, cfg.data.pin_mem),
    )  # fmt: skip


def build_data(cfg: FinetuneConfig, dist: DistInfo) -> Data:
    """ImageFolders (the training one restricted to ``cfg.subset``), sharded loaders."""
    d, o = cfg.data, cfg.optimization
    train_folder, val_folder = _folders(cfg, dist)
    train = SafeImageFolder(train_folder, recipe.train_transform(d), on_error=d.on_error)
    val_tf = eval_transform(d.img_size, d.crop_ratio, d.mean, d.std)
    val = SafeImageFolder(val_folder, val_tf, on_error=d.on_error)
    if train.classes != val.classes:
        raise ConfigError(f"{train_folder} and {val_folder} have different class folders")
    num_classes = len(train.classes)
    subset = subset_of(train, cfg.subset)
    if subset is not None:  # low-shot finetuning: 1percent.txt or N images per class
        train = Subset(train, subset)
    sampler = ShardSampler(len(train), dist.rank, dist.world_size, True, cfg.meta.seed)
    train_loader = _loader(train, d.batch_size, sampler, cfg, True, dist.device)
    val_sampler = ShardSampler(len(val), dist.rank, dist.world_size)
    val_batch = cfg.finetune.eval_batch_size or 2 * d.batch_size
    val_loader = _loader(val, val_batch, val_sampler, cfg, False, dist.device)
    steps_per_epoch = len(train_loader) // o.accum_iter
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{train_folder}: {len(train)} images make no full step of data.batch_size="
            f"{d.batch_size} x accum_iter={o.accum_iter} x {dist.world_size} processes"
        )
    return Data(train, val, sampler, train_loader, val_loader, num_classes, steps_per_epoch)


def _amp_dtype(cfg: FinetuneConfig, device: torch.device) -> Optional[torch.dtype]:
    return amp_dtype(device, cfg.meta.use_bfloat16, cfg.finetune.use_fp16)


class Finetuner:
    """The optimizer, schedule, scaler, EMA, counters and run log around one classifier."""

    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module, data: Data, dist: DistInfo):
        o, ft = cfg.optimization, cfg.finetune
        self.cfg, self.data, self.dist = cfg, data, dist
        self.folder = Path(cfg.logging.folder)
        self.amp_dtype = _amp_dtype(cfg, dist.device)
        self.effective_batch = cfg.data.batch_size * o.accum_iter * dist.world_size
        self.lr = recipe.absolute_lr(o, self.effective_batch)
        self.optimizer = recipe.build_optimizer(recipe.param_groups(model, o), o, self.lr)
        self.scheduler = recipe.build_scheduler(self.optimizer, o, data.steps_per_epoch)
        self.scaler = grad_scaler(dist.device, self.amp_dtype)
        self.ema = None
        if ft.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=ft.model_ema_decay)
        self.model = model
        self.state = TrainState()
        self.run_log = RunLogger(self.folder, enabled=dist.is_main,
                                 tensorboard=cfg.logging.tensorboard)  # fmt: skip
        self.opts = StepOptions(
            device=dist.device, accum_iter=o.accum_iter, clip_grad=o.clip_grad,
            amp_dtype=self.amp_dtype, scaler=self.scaler,
            mixup=recipe.build_mixup(cfg.mixup, data.num_classes), ema=self.ema,
            log_freq=cfg.logging.log_freq, checkpoint_every=ft.checkpoint_every,
            steps_per_epoch=data.steps_per_epoch,
        )  # fmt: skip
        self.criterion = recipe.build_criterion(cfg.mixup)

    def describe(self) -> None:
        d = self.data
        logger.info("%d classes, %d train / %d val images; effective batch %d, lr %.3e, %d steps "
                    "per epoch", d.num_classes, len(d.train), len(d.val), self.effective_batch,
                    self.lr, d.steps_per_epoch)  # fmt: skip
        logger.info(
            "parameter groups:\n%s", recipe.group_table(self.model, self.optimizer, self.lr)
        )

    def resume(self, path: Path) -> None:
        """Weights, optimizer, scaler, EMA, counters and RNG of ``save_last``'s checkpoint."""
        obj = load_training_state(path, self.model, self.optimizer, self.scaler,
                                  rank=self.dist.rank)  # fmt: skip
        self.state = TrainState(obj["epoch"], obj["step"], obj["batch"], obj["best_top1"])
        sums = dict(obj.get("epoch_sums") or {})
        if self.dist.rank != 0:
            sums.pop("skipped", None)  # the saved count is every rank's: rank 0 carries it
        for key, value in sums.items():
            setattr(self.state, key, value)
        if self.ema is not None and obj.get("model_ema") is not None:
            self.ema.module.load_state_dict(obj["model_ema"])
        self.opts.last_good = path

    def wrap_ddp(self) -> None:
        if self.dist.distributed:
            ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def save_last(self) -> None:
        """``checkpoint-last.pth``: everything an exact resume needs (every rank calls it)."""
        s = self.state
        save_training_state(
            self.folder / LAST, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
            epoch=s.epoch, step=s.step, is_main=self.dist.is_main, batch=s.batch,
            best_top1=s.best_top1, epoch_sums=s.epoch_sums(self.dist.device),
            model_ema=self.ema.module.state_dict() if self.ema is not None else None,
            config=to_dict(self.cfg),
        )  # fmt: skip
        self.opts.last_good = self.folder / LAST

    def save_best(self, metrics: dict) -> None:
        """``checkpoint-best.pth`` (weights only) when ``metrics`` beat the best top-1 so far."""
        if metrics["acc1"] <= self.state.best_top1:
            return
        self.state.best_top1 = metrics["acc1"]
        if self.dist.is_main:
            save_checkpoint(
                {"model": unwrap(self.model).state_dict(), "epoch": self.state.epoch,
                 "metrics": metrics, "config": to_dict(self.cfg)},
                self.folder / BEST,
            )  # fmt: skip

    def epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (the rest of it after a mid-epoch resume), evaluate, log, save."""
        cfg, d, state = self.cfg, self.data, self.state
        d.sampler.set_epoch(epoch, start=state.batch * cfg.data.batch_size)
        d.train_loader.generator.manual_seed(cfg.meta.seed * 100003 + epoch * 1009 + self.dist.rank)
        train = train_one_epoch(self.model, self.criterion, d.train_loader, self.optimizer,
                                self.scheduler, state, self.opts, self.run_log,
                                save=self.save_last)  # fmt: skip
        state.new_epoch()
        metrics = self.evaluate(self.model)
        row = {f"val_{k}": v for k, v in metrics.items()}
        if self.ema is not None:
            row.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        self.run_log.log(step=state.step, epoch=state.epoch, train_loss=train["loss"],
                         train_skipped=train["skipped"], train_overflow_skipped=train["overflow"],
                         **row)  # fmt: skip
        logger.info("epoch %d: train loss %.4f, val acc@1 %.2f acc@5 %.2f (%d images, %d skipped)",
                    state.epoch, train["loss"], metrics["acc1"], metrics["acc5"],
                    metrics["images"], metrics["skipped"] + train["skipped"])  # fmt: skip
        self.save_best(metrics)
        self.save_last()
        return metrics

    def evaluate(self, model: torch.nn.Module) -> dict:
        return evaluate(model, self.data.val_loader, self.dist.device, self.amp_dtype)

    def fit(self) -> dict:
        """Train the remaining epochs; returns the final validation metrics."""
        metrics = None
        for epoch in range(self.state.epoch, self.cfg.optimization.epochs):
            metrics = self.epoch(epoch)
        if metrics is None:  # resumed a finished run
            metrics = self.evaluate(self.model)
        self.run_log.close()
        return metrics

    def write_results(self, metrics: dict) -> None:
        m, s = self.cfg.model, self.state
        write_results(
            self.folder, "finetune", {"top1": metrics["acc1"], "top5": metrics["acc5"]},
            encoder_checkpoint=m.checkpoint, which=m.which,
            output_checkpoint=str(self.folder / LAST), settings=to_dict(self.cfg),
            best_top1=s.best_top1, epochs=s.epoch, steps=s.step,
            train_images=len(self.data.train), val_images=metrics["images"],
            val_skipped=metrics["skipped"],
        )  # fmt: skip


def train_and_evaluate(cfg: FinetuneConfig, own: RunFolder, eval_ckpt: Optional[str]) -> dict:
    """The work of ``run.run`` in the run folder ``own``: train and evaluate, or (``eval_ckpt``)
    only evaluate; returns the final metrics."""
    folder = own.path
    dist = init_distributed(cfg.meta.device)
    setup_console_logging(dist.is_main)
    seed_everything(cfg.meta.seed, dist.rank)
    data = build_data(cfg, dist)
    model = recipe.build_classifier(cfg, data.num_classes).to(dist.device)
    model = maybe_compile(model, cfg.finetune.compile)
    if eval_ckpt is not None:  # trains nothing: config.yaml stays the training run's
        return _evaluate_only(cfg, model, eval_ckpt or str(folder / BEST), data, dist)
    if dist.is_main:
        save_config(cfg, folder)
    trainer = Finetuner(cfg, model, data, dist)
    trainer.describe()
    if own.start is not None:
        trainer.resume(own.start)
    own.resumed(trainer.run_log, trainer.state.step if own.start is not None else -1)
    trainer.wrap_ddp()
    metrics = trainer.fit()
    if dist.is_main:
        trainer.write_results(metrics)
    return metrics


def _evaluate_only(
    cfg: FinetuneConfig, model: torch.nn.Module, ckpt: str, data: Data, dist: DistInfo
) -> dict:
    """Load a finetuned ``{"model": ...}`` checkpoint strictly and evaluate it."""
    obj = read_checkpoint(ckpt)
    try:
        model.load_state_dict(obj["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: not a finetuned checkpoint of this model ({e})") from None
    metrics = evaluate(model, data.val_loader, dist.device, _amp_dtype(cfg, dist.device))
    logger.info("%s: acc@1 %.2f acc@5 %.2f on %d images", ckpt, metrics["acc1"],
                metrics["acc5"], metrics["images"])  # fmt: skip
    if dist.is_main:
        write_results(
            cfg.logging.folder, "finetune", {"top1": metrics["acc1"], "top5": metrics["acc5"]},
            encoder_checkpoint=ckpt, which="model", settings=to_dict(cfg),
            val_images=metrics["images"], eval_only=True,
        )  # fmt: skip
    return metrics
