"""The I-JEPA / StoP pretraining loop behind ``main_pretrain.py``.

One iteration: the EMA target encoder sees the full images, its tokens are normalised
(``model.target_norm``) and gathered at the target positions; the context encoder sees the context
patches, the predictor predicts the target tokens; smooth-L1 (or L2) loss; AdamW step; EMA update
of the target encoder. Learning rate, weight decay and EMA momentum follow the official
per-iteration schedules (``schedules.py``).

Checkpoints use the official layout (``encoder``, ``predictor``, ``target_encoder`` with DDP
``module.`` prefixes, ``opt``, ``scaler``, ``epoch``, ``loss``, ``batch_size``, ``world_size``,
``lr``) plus ``step``, per-rank ``rng``, ``target_norm``, per-rank ``packing_waiting`` (the
images packing carries over to the next step) and ``config`` for an exact resume.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..config import (
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
    require,
    require_paths,
    save_config,
    to_dict,
)
from ..data.folder import SafeImageFolder, collate_skip_none
from ..engine.distributed import (
    DistInfo,
    all_gather_cat,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
)
from ..engine.logger import RunLogger, setup_console_logging
from ..engine.resume import (
    LAST,
    gather_objects,
    gather_rng_states,
    load_part,
    restore_rng_states,
)
from ..engine.utils import autocast, progress, seed_everything
from ..errors import CheckpointError, ConfigError
from ..eval.rank import rankme
from ..io.read import read_checkpoint
from ..io.save import save_checkpoint
from ..masks.multiblock import MaskSection, MultiBlockMaskSampler
from ..models.diffmoe import moe_aux_loss
from ..run_folder import ALWAYS_ALLOWED, RunFolder, add_run_flags, open_run
from ..runs import check_finite, run_main, write_results
from .data import DataSection, GlobalBatchSampler, pretrain_transform, resolve_folders
from .model import (
    ContextPath,
    ModelSection,
    build_models,
    ema_update_,
    prediction_loss,
    targets_at,
)
from .packing import (
    PAD,
    PackingSection,
    PackingStream,
    encode_packed,
    packed_loss,
    per_image_mean,
)
from .probes import knn_probe, lidar_probe
from .schedules import Schedules
from .targets import TargetNorm, target_token_mask
from .token_drop import TokenDrop, sample_token_drop

logger = logging.getLogger("ijepa_toolkit")
SUBMODULES = ("encoder", "predictor", "target_encoder")
# what a --resume may change besides run_folder.ALWAYS_ALLOWED: when checkpoints and RankMe
# rows are written (RankMe reads the step's targets, it draws no random number)
RESUME_ALLOWED = (*ALWAYS_ALLOWED, "logging.checkpoint_freq", "logging.rankme_freq")


@dataclass
class OptimizationSection:
    """The official ``optimization`` section; ``warmup`` and ``epochs`` in epochs."""

    ema: tuple[float, float] = (0.996, 1.0)
    epochs: int = 300
    final_lr: float = 1.0e-6
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0
    lr: float = 0.001
    start_lr: float = 0.0002
    warmup: float = 40
    weight_decay: float = 0.04
    clip_grad: float = 0.0  # max grad norm; 0 = no clipping (official)

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lo, hi = self.ema
        return [
            ("ema", self.ema, 0 <= lo <= hi <= 1, "[start, end] with 0 <= start <= end <= 1"),
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
        ]


@dataclass
class PretrainLogging(LoggingSection):
    checkpoint_freq: int = 1  # epochs between checkpoint-last.pth writes (and the last epoch)
    rankme_freq: int = 100  # iterations between RankMe rows (global batch); 0 = off
    knn_freq: int = 0  # epochs between kNN probes on data.knn_*_folder; 0 = off
    knn_k: int = 20
    lidar_freq: int = 0  # epochs between LiDAR rows; 0 = off
    lidar_images: int = 256
    lidar_views: int = 4


@dataclass
class PretrainConfig:
    meta: MetaSection = field(default_factory=MetaSection)
    data: DataSection = field(default_factory=DataSection)
    mask: MaskSection = field(default_factory=MaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    logging: PretrainLogging = field(default_factory=PretrainLogging)
    packing: PackingSection = field(default_factory=PackingSection)


def param_groups(encoder: torch.nn.Module, predictor: torch.nn.Module) -> list[dict]:
    """The official AdamW groups: weight decay on weights, none on biases and 1-D tensors."""
    groups = []
    for exclude in (False, True):
        for module in (encoder, predictor):
            params = [
                p for n, p in module.named_parameters()
                if p.requires_grad and (("bias" in n or p.ndim == 1) == exclude)
            ]  # fmt: skip
            group = {"params": params}
            if exclude:
                group.update(WD_exclude=True, weight_decay=0.0)
            groups.append(group)
    return groups


def check_values(cfg: PretrainConfig) -> None:
    """Checks across sections (each section checks its own values when the config is built)."""
    mk, m, b = cfg.mask, cfg.model, cfg.data.batch_size
    require([
        ("mask.group_size", mk.group_size, not mk.group_size or b % mk.group_size == 0,
         f"a divisor of data.batch_size={b} (or 0: the batch)"),
    ])  # fmt: skip
    if cfg.packing.enabled and (
        m.num_registers or m.pred_num_registers or m.pred_capacity < 1 or m.pred_repeats > 1
        or m.moe_experts or m.stop
    ):  # fmt: skip
        raise ConfigError(
            "packing.enabled=true works without model.num_registers, model.pred_num_registers, "
            "model.moe_experts, model.stop and predictor token dropping"
        )
    if m.tome_rates and not cfg.packing.enabled:
        raise ConfigError("model.tome_rates is implemented for packed rows: set packing.enabled")


def check_folders(cfg: PretrainConfig) -> None:
    """The data folders exist: cheap, before any model is built."""
    d = cfg.data
    if not d.digits_root:  # (digits: built at start, the kNN folders are their splits)
        knn = [(f"data.{k}", getattr(d, k), "folder") for k in ("knn_train_folder",
               "knn_val_folder") if getattr(d, k)]  # fmt: skip
        require_paths([("data.train_folder", d.train_folder, "folder"), *knn])


def _prefixed(module: torch.nn.Module) -> dict:
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


class Pretrainer:
    """Builds everything a config names and runs (or resumes) the pretraining."""

    def __init__(self, cfg: PretrainConfig, dist_info: DistInfo):
        check_values(cfg)
        check_folders(cfg)
        self.cfg, self.dist, self.device = cfg, dist_info, dist_info.device
        self.folder = Path(cfg.logging.folder)
        self.ckpt_path = self.folder / LAST
        self.last_good: Optional[Path] = None  # newest checkpoint written or resumed from
        torch.manual_seed(cfg.meta.seed)  # identical initial weights on every rank
        self.encoder, self.predictor, self.target_encoder = (
            m.to(self.device) for m in build_models(cfg.model, cfg.data.crop_size)
        )
        seed_everything(cfg.meta.seed, dist_info.rank)  # each rank its own data / noise stream
        self.context = ContextPath(
            self.encoder, self.predictor, cfg.model.tome_rates, cfg.model.tome_placement,
            cfg.model.tome_mode,
        )  # fmt: skip
        self.target_norm = TargetNorm(cfg.model.target_norm, self.encoder.embed_dim).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.encoder, self.predictor))
        self._build_data()
        grid = cfg.data.crop_size // self.encoder.arch.patch_size
        self.masks = MultiBlockMaskSampler((grid, grid), cfg.mask)
        self.packer = PackingStream(self.encoder.arch.patch_size, cfg.packing)
        self.model = self.context
        if dist_info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.context, device_ids=ids)
        self.epoch, self.step = 0, 0
        self.metrics: dict = {}  # the results so far: probes at init, the last epoch's values
        self.log = RunLogger(self.folder, enabled=dist_info.is_main,
                             tensorboard=cfg.logging.tensorboard)  # fmt: skip

    def _build_data(self) -> None:
        """Transform, image folder, world-size-free batch sampler, loader and the schedules."""
        cfg, dist_info = self.cfg, self.dist
        train_folder, self.knn_train, self.knn_val = resolve_folders(cfg.data)
        self.transform = pretrain_transform(cfg.data)
        dataset = SafeImageFolder(train_folder, transform=self.transform)
        self.sampler = GlobalBatchSampler(
            len(dataset), cfg.data.batch_size, dist_info.rank, dist_info.world_size, cfg.meta.seed
        )
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=cfg.data.num_workers,
            pin_memory=cfg.data.pin_mem and self.device.type == "cuda",
            collate_fn=collate_skip_none,
        )  # fmt: skip
        opt = cfg.optimization
        self.schedules = Schedules(
            iterations_per_epoch=len(self.sampler), epochs=opt.epochs, warmup_epochs=opt.warmup,
            start_lr=opt.start_lr, lr=opt.lr, final_lr=opt.final_lr,
            weight_decay=opt.weight_decay, final_weight_decay=opt.final_weight_decay,
            ema=tuple(opt.ema), ipe_scale=opt.ipe_scale,
        )  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, loss: float) -> None:
        """Write ``checkpoint-last.pth`` atomically (every rank calls: RNG states are gathered)."""
        rngs = gather_rng_states()
        waiting = gather_objects(self.packer.state_dict())
        self.last_good = self.ckpt_path  # (on every rank: the path rank 0 writes now)
        if not self.dist.is_main:
            return
        obj = {name: _prefixed(getattr(self, name)) for name in SUBMODULES}
        obj.update(
            opt=self.optimizer.state_dict(), scaler=None, epoch=self.epoch, loss=loss,
            batch_size=self.cfg.data.batch_size, world_size=self.dist.world_size,
            lr=self.cfg.optimization.lr, step=self.step, rng=rngs,
            target_norm=self.target_norm.state_dict(), config=to_dict(self.cfg),
            packing_waiting=waiting, metrics=self.metrics,
        )  # fmt: skip
        save_checkpoint(obj, self.ckpt_path)

    def resume(self) -> None:
        """Restore weights, optimizer, counters, target-norm statistics and this rank's RNG."""
        obj = read_checkpoint(self.ckpt_path)
        missing = [k for k in (*SUBMODULES, "opt", "target_norm", "epoch", "step", "rng")
                   if k not in obj]  # fmt: skip
        if missing:
            raise CheckpointError(f"{self.ckpt_path}: not a resumable pretraining checkpoint "
                                  f"(missing {', '.join(missing)})")  # fmt: skip
        for name in SUBMODULES:
            load_part(getattr(self, name), _unprefixed(obj[name]), self.ckpt_path, name)
        load_part(self.optimizer, obj["opt"], self.ckpt_path, "opt")
        load_part(self.target_norm, obj["target_norm"], self.ckpt_path, "target_norm")
        self.epoch, self.step = int(obj["epoch"]), int(obj["step"])
        self.metrics = dict(obj.get("metrics") or {})  # a finished run's results stay its own
        restore_rng_states(obj["rng"], self.dist.rank, self.ckpt_path)
        waiting = obj.get("packing_waiting") or []
        if self.dist.rank < len(waiting):
            self.packer.load_state_dict(waiting[self.dist.rank])
        elif any(w["keys"] for w in waiting):
            logger.warning("%s: saved with %d ranks; rank %d starts with no carried-over images",
                           self.ckpt_path, len(waiting), self.dist.rank)  # fmt: skip
        logger.info("resumed from %s: epoch %d, step %d", self.ckpt_path, self.epoch, self.step)
        self.last_good = self.ckpt_path

    # -- one iteration ---------------------------------------------------------------------
    def sample_masks(self, n: int) -> list[tuple[slice, list[torch.Tensor], list[torch.Tensor]]]:
        """``(rows, masks_enc, masks_pred)`` for each mask group of this rank's ``n`` images.

        Mask lengths are equal within a group of ``mask.group_size`` images (default: the
        per-rank batch, as the official code). In default mode group ``g`` of the global batch
        draws from a generator seeded by (seed, step, g), so a run on W ranks with batch b and
        one process with batch W*b and group size b use the same masks; legacy mode draws from
        the global RNG as the official sampler.
        """
        b = self.cfg.data.batch_size
        size = self.cfg.mask.group_size or b
        groups = []
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            count = rows.stop - rows.start
            if self.cfg.mask.legacy:
                enc, pred = self.masks.sample(count, self.step)
            else:
                index = (self.dist.rank * b + start) // size
                g = torch.Generator()
                g.manual_seed(hash((self.cfg.meta.seed, self.step, index)) % 2**63)
                enc, pred = self.masks.sample(count, self.step, g)
            groups.append((rows, [m.to(self.device) for m in enc],
                           [m.to(self.device) for m in pred]))  # fmt: skip
        return groups

    def sample_token_drop(self, masks_enc: list, masks_pred: list) -> Optional[TokenDrop]:
        """The predictor's token subsets for one mask group (None: token dropping is off)."""
        m = self.cfg.model
        if m.pred_capacity >= 1.0 and m.pred_repeats == 1:
            return None
        return sample_token_drop(
            masks_enc,
            masks_pred,
            m.pred_capacity,
            m.pred_repeats,
            m.pred_replacement,
            window=m.pred_window,
            grid_w=self.cfg.data.crop_size // self.encoder.arch.patch_size,
        )

    def train_step(self, images: torch.Tensor) -> dict:
        """One optimisation step on (B, C, H, W) images; returns the monitored scalars.

        The target encoder sees the whole batch at once; the context path runs once per mask
        group, accumulating the gradient of the mean loss (DDP synchronises on the last group).
        """
        lr, wd, momentum = self.schedules.at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude"):
                group["weight_decay"] = wd
        extra: dict = {}
        if self.cfg.packing.enabled:
            total, pooled, extra = self.packed_loss(images)
        else:
            total, pooled = self.masked_loss(images)
        loss_value = float(all_reduce_sum(total)) / self.dist.world_size
        where = f"step {self.step + 1} (epoch {self.epoch + 1})"
        check_finite(loss_value, where, self.last_good)
        params = [p for p in self.context.parameters() if p.requires_grad]
        max_norm = self.cfg.optimization.clip_grad or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update_(self.target_encoder, self.encoder, momentum)
        self.step += 1
        row = dict(loss=loss_value, lr=lr, wd=wd, momentum=momentum, grad_norm=grad_norm,
                   target_std=float(pooled.std(dim=0).mean()), **extra)  # fmt: skip
        freq = self.cfg.logging.rankme_freq
        if freq and self.step % freq == 0:
            row["rankme"] = rankme(all_gather_cat(pooled))
        return row

    def moe_loss(self) -> torch.Tensor:
        """Weighted DiffMoE capacity-predictor BCE of the context encoder's last forward."""
        if not self.cfg.model.moe_experts:
            return torch.zeros((), device=self.device)
        return self.cfg.model.moe_aux_weight * moe_aux_loss(self.encoder)

    def masked_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of the multiblock I-JEPA loss; returns (loss, (B, D) pooled targets)."""
        groups = self.sample_masks(len(images))
        with autocast(self.device, self.cfg.meta.use_bfloat16), torch.no_grad():
            tokens = self.target_encoder.forward_features(images)
            normed = self.target_norm(tokens, target_token_mask(groups, tokens.shape[:2]))
        total = torch.zeros((), device=self.device)
        for i, (rows, masks_enc, masks_pred) in enumerate(groups):
            last = i == len(groups) - 1
            sync = self.model.no_sync() if self.dist.distributed and not last else nullcontext()
            with sync:
                with autocast(self.device, self.cfg.meta.use_bfloat16):
                    drop = self.sample_token_drop(masks_enc, masks_pred)
                    if drop is None:
                        h = targets_at(normed[rows], masks_pred, len(masks_enc))
                    else:
                        targets = normed[rows].repeat(drop.repeats, 1, 1)
                        h = targets_at(targets, drop.masks_pred, len(masks_enc))
                    z = self.model(images[rows], masks_enc, masks_pred, drop)
                    loss = prediction_loss(z, h, self.cfg.model.loss)
                    loss = (loss + self.moe_loss()) / len(groups)
                loss.backward()
            total += loss.detach().float()
        return total, tokens.mean(dim=1).float()

    def packed_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Backward of the packed variable-resolution loss (packing.py).

        Returns (loss, (B, D) per-image mean target tokens, {"padding": this rank's padding
        rate, "images": images trained on in this step, summed over ranks}).
        """
        g = torch.Generator()
        g.manual_seed(hash((self.cfg.meta.seed, self.step, self.dist.rank)) % 2**63)
        batch, _ = self.packer(list(images.cpu()), list(range(len(images))), g)
        batch = batch.to(self.device)
        n_ctx = batch.ctx_ids.shape[1]
        with autocast(self.device, self.cfg.meta.use_bfloat16), torch.no_grad():
            tokens = encode_packed(
                self.target_encoder, torch.cat([batch.ctx_px, batch.tgt_px], dim=1),
                torch.cat([batch.ctx_ids, batch.tgt_ids], dim=1),
                torch.cat([batch.ctx_gsample, batch.tgt_gsample], dim=1), batch.grids,
                self.cfg.model.tome_rates, self.cfg.model.tome_placement, self.cfg.model.tome_mode,
            )  # fmt: skip
            target = self.target_norm(tokens[:, n_ctx:], batch.tgt_gsample != PAD)
        with autocast(self.device, self.cfg.meta.use_bfloat16):
            z = self.model(batch)
            loss = packed_loss(z, target, batch.tgt_gsample, self.cfg.model.loss)
            loss = loss + self.moe_loss()
        loss.backward()
        gsample = torch.cat([batch.ctx_gsample, batch.tgt_gsample], dim=1)
        pooled = per_image_mean(tokens.float(), gsample, len(batch.grids))
        trained = torch.tensor(float(sum(len(r) for r in batch.rows)), device=self.device)
        extra = {"padding": batch.padding_rate, "images": int(all_reduce_sum(trained))}
        return loss.detach().float(), pooled, extra

    # -- epochs ---------------------------------------------------------------------------
    def probes(self) -> dict:
        """kNN / LiDAR values due after ``self.epoch`` epochs (0: at init), on the main rank."""
        cfg, out = self.cfg.logging, {}
        due = lambda freq: freq and (self.epoch % freq == 0 or self.epoch == self.schedules.epochs)  # noqa: E731
        if self.dist.is_main and due(cfg.knn_freq) and self.knn_train and self.knn_val:
            size = self.cfg.data.crop_size
            out["knn_top1"] = knn_probe(
                self.target_encoder, self.knn_train, self.knn_val, size, self.device, cfg.knn_k
            )
        if self.dist.is_main and due(cfg.lidar_freq) and self.knn_train:
            out["lidar"] = lidar_probe(self.target_encoder, self.knn_train, self.transform,
                                       self.device, cfg.lidar_images, cfg.lidar_views)  # fmt: skip
        barrier()
        return out

    def run(self) -> dict:
        """Train from the current epoch to ``optimization.epochs``; returns the final metrics."""
        cfg = self.cfg
        epochs = cfg.optimization.epochs
        logger.info("pretraining: %d iterations/epoch, %d epochs, global batch %d, from epoch %d",
                    len(self.sampler), epochs, cfg.data.batch_size * self.dist.world_size,
                    self.epoch)  # fmt: skip
        initial = {f"{k}_init": v for k, v in self.probes().items()} if self.epoch == 0 else {}
        if initial:
            self.log.log(0, epoch=0, **initial)
            logger.info("before training: %s", initial)
        self.metrics.update(initial)
        while self.epoch < epochs:
            self.sampler.set_epoch(self.epoch)
            self.context.train()
            losses, start = [], time.time()
            batches = progress(self.loader, f"epoch {self.epoch + 1}/{epochs}",
                               enabled=self.dist.is_main)  # fmt: skip
            for batch in batches:
                if batch is None:
                    raise RuntimeError("every image of a batch was unreadable")
                images = batch[0].to(self.device, non_blocking=True)
                row = self.train_step(images)
                losses.append(row["loss"])
                batches.set(loss=row["loss"], lr=row.get("lr"))
                if self.step % cfg.logging.log_freq == 0 or "rankme" in row:
                    self.log.log(self.step, epoch=self.epoch, **row)
            self.epoch += 1
            metrics = {"loss": sum(losses) / len(losses), **self.probes()}
            initial = {k: v for k, v in self.metrics.items() if k.endswith("_init")}
            self.metrics = {**initial, **metrics}
            seconds = time.time() - start
            extra = {k: v for k, v in metrics.items() if k != "loss"}
            self.log.log(self.step, epoch=self.epoch, epoch_loss=metrics["loss"],
                         epoch_seconds=seconds, **extra)  # fmt: skip
            logger.info("epoch %d/%d: loss %.4f (%.1fs) %s", self.epoch, epochs, metrics["loss"],
                        seconds, extra)  # fmt: skip
            if self.epoch % cfg.logging.checkpoint_freq == 0 or self.epoch == epochs:
                self.save(metrics["loss"])
        return self.metrics


def pretrain(
    cfg: PretrainConfig, dist_info: DistInfo, resume: bool = False, overwrite: bool = False
) -> dict:
    """Run (``resume``: continue) a pretraining; writes config, logs, checkpoint, results.json.

    The run owns ``logging.folder`` (``run_folder.open_run``): a folder holding another run's
    outputs needs ``resume`` or ``overwrite``, and a resume with changed settings is refused."""
    check_values(cfg)
    check_folders(cfg)  # (before --overwrite deletes anything)
    own = open_run(cfg.logging.folder, to_dict(cfg), resume=resume, overwrite=overwrite,
                   allowed=RESUME_ALLOWED, is_main=dist_info.is_main)  # fmt: skip
    with own:
        return _pretrain(cfg, dist_info, own)


def _pretrain(cfg: PretrainConfig, dist_info: DistInfo, own: RunFolder) -> dict:
    logger.info("pretraining %s", describe(cfg))
    trainer = Pretrainer(cfg, dist_info)
    if dist_info.is_main:
        save_config(cfg, trainer.folder)
    if own.start is not None:
        trainer.resume()
    own.resumed(trainer.log, trainer.step if own.start is not None else -1)
    try:
        metrics = trainer.run()
    finally:
        trainer.log.close()
    if dist_info.is_main:
        write_results(trainer.folder, "pretrain", metrics, encoder_checkpoint=None,
                      which="random_init", output_checkpoint=str(trainer.ckpt_path),
                      settings=to_dict(cfg), epochs=trainer.epoch, steps=trainer.step,
                      model=dataclasses.asdict(trainer.encoder.arch))  # fmt: skip
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``main_pretrain.py --fname CFG [--resume | --overwrite] [key=value ...]`` (under torchrun
    for many processes); returns the exit status (``runs.run_main``: bad input 2, a diverged
    loss 1)."""
    parser = config_parser("I-JEPA / StoP pretraining")
    add_run_flags(parser)

    def work() -> None:
        cfg, args = parse_config(PretrainConfig, parser, argv)
        dist_info = init_distributed(cfg.meta.device)
        setup_console_logging(dist_info.is_main)
        pretrain(cfg, dist_info, resume=args.resume, overwrite=args.overwrite)

    return run_main(work, cleanup)


def describe(cfg: PretrainConfig) -> str:
    """One line naming the variant a config trains (for logs)."""
    m = cfg.model
    parts = [m.model_name, f"patch {m.patch_size}", f"out-norm {m.output_norm}",
             f"target-norm {m.target_norm}"]  # fmt: skip
    if m.stop:
        parts.append(f"StoP sigma {m.stop_sigma}")
    if cfg.mask.legacy:
        parts.append("legacy masks")
    return ", ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
