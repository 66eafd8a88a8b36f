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
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from ..config import ConfigError, LoggingSection, MetaSection, require, save_config, to_dict
from ..data.folder import SafeImageFolder, collate_skip_none
from ..engine.distributed import DistInfo, all_gather_cat, all_reduce_sum, barrier
from ..engine.logger import RunLogger, write_results
from ..engine.resume import (
    LAST,
    gather_objects,
    gather_rng_states,
    load_part,
    restore_rng_states,
)
from ..engine.utils import autocast, progress, seed_everything
from ..eval.rank import rankme
from ..masks.multiblock import MaskSection, MultiBlockMaskSampler
from ..models.diffmoe import moe_aux_loss
from .data import DataSection, GlobalBatchSampler, pretrain_transform, resolve_folders
from .model import (
    ContextPath,
    ModelSection,
    build_models,
    ema_update_,
    prediction_loss,
    targets_at,
)
from .packing import PackingSection, PackingStream, encode_packed, packed_loss, per_image_mean
from .probes import knn_probe, lidar_probe
from .schedules import Schedules
from .targets import TargetNorm
from .token_drop import TokenDrop, sample_token_drop

logger = logging.getLogger("ijepa_toolkit")
SUBMODULES = ("encoder", "predictor", "target_encoder")


@dataclass
class PretrainMeta(MetaSection):
    resume: bool = True  # continue from logging.folder/checkpoint-last.pth when it exists


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
    meta: PretrainMeta = field(default_factory=PretrainMeta)
    data: DataSection = field(default_factory=DataSection)
    mask: MaskSection = field(default_factory=MaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    logging: PretrainLogging = field(default_factory=PretrainLogging)
    packing: PackingSection = field(default_factory=PackingSection)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


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


def _interval(pair: Sequence[float], lo: float, hi: float) -> bool:
    """``pair`` is ``[a, b]`` with ``lo <= a <= b <= hi``."""
    return len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi


def check_values(cfg: PretrainConfig) -> None:
    """Values that would fail deep inside a step, or train something else than asked, silently."""
    mk, o, m = cfg.mask, cfg.optimization, cfg.model
    require([
        ("mask.num_pred_masks", mk.num_pred_masks, mk.num_pred_masks >= 1, ">= 1"),
        ("mask.num_enc_masks", mk.num_enc_masks, mk.num_enc_masks >= 1, ">= 1"),
        ("mask.pred_mask_scale", mk.pred_mask_scale, _interval(mk.pred_mask_scale, 0, 1),
         "[min, max] with 0 <= min <= max <= 1"),
        ("mask.enc_mask_scale", mk.enc_mask_scale, _interval(mk.enc_mask_scale, 0, 1),
         "[min, max] with 0 <= min <= max <= 1"),
        ("mask.aspect_ratio", mk.aspect_ratio, _interval(mk.aspect_ratio, 1e-6, math.inf),
         "[min, max] with 0 < min <= max"),
        ("optimization.ema", o.ema, _interval(o.ema, 0, 1),
         "[start, end] with 0 <= start <= end <= 1"),
        ("optimization.epochs", o.epochs, o.epochs >= 1, ">= 1"),
        ("data.batch_size", cfg.data.batch_size, cfg.data.batch_size >= 1, ">= 1"),
        ("model.stop_sigma", m.stop_sigma, m.stop_sigma >= 0, ">= 0"),
    ])  # fmt: skip


def _prefixed(module: torch.nn.Module) -> dict:
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


class Pretrainer:
    """Builds everything a config names and runs (or resumes) the pretraining."""

    def __init__(self, cfg: PretrainConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        check_values(cfg)
        if cfg.mask.group_size and cfg.data.batch_size % cfg.mask.group_size:
            raise ConfigError(
                f"mask.group_size={cfg.mask.group_size} must divide "
                f"data.batch_size={cfg.data.batch_size}"
            )
        m = cfg.model
        if m.num_registers < 0 or m.pred_num_registers < 0:
            raise ConfigError(
                f"model.num_registers={m.num_registers} and "
                f"model.pred_num_registers={m.pred_num_registers} must be >= 0"
            )
        if not 0 < m.pred_capacity <= 1 or m.pred_repeats < 1:
            raise ConfigError(
                f"model.pred_capacity={m.pred_capacity} must be in (0, 1] and "
                f"model.pred_repeats={m.pred_repeats} at least 1"
            )
        if not m.pred_replacement and m.pred_capacity * m.pred_repeats > 1 + 1e-9:
            raise ConfigError(
                f"model.pred_capacity={m.pred_capacity} x model.pred_repeats={m.pred_repeats} > 1: "
                "disjoint subsets need capacity * repeats <= 1 (or model.pred_replacement=true)"
            )
        if cfg.packing.enabled and (
            m.num_registers or m.pred_num_registers or m.pred_capacity < 1 or m.pred_repeats > 1
            or m.moe_experts or m.target_norm not in ("layernorm", "none") or m.stop
        ):  # fmt: skip
            raise ConfigError(
                "packing.enabled=true works with model.target_norm layernorm/none and without "
                "model.num_registers, model.pred_num_registers, model.moe_experts, model.stop and "
                "predictor token dropping"
            )
        if m.tome_rates and not cfg.packing.enabled:
            raise ConfigError(
                "model.tome_rates is implemented for packed rows: set packing.enabled"
            )
        self.device = dist_info.device
        self.folder = Path(cfg.logging.folder)
        self.ckpt_path = self.folder / LAST
        torch.manual_seed(cfg.meta.seed)  # identical initial weights on every rank
        self.encoder, self.predictor, self.target_encoder = (
            m.to(self.device) for m in build_models(cfg.model, cfg.data.crop_size)
        )
        seed_everything(cfg.meta.seed, dist_info.rank)  # each rank its own data / noise stream
        self.context = ContextPath(self.encoder, self.predictor, cfg.model.tome_rates)
        self.target_norm = TargetNorm(cfg.model.target_norm, self.encoder.embed_dim).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.encoder, self.predictor))
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
        grid = cfg.data.crop_size // self.encoder.arch.patch_size
        self.masks = MultiBlockMaskSampler((grid, grid), cfg.mask)
        self.packer = PackingStream(self.encoder.arch.patch_size, cfg.packing)
        self.model = self.context
        if dist_info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.context, device_ids=ids)
        self.epoch, self.step = 0, 0
        self.log = RunLogger(self.folder, enabled=dist_info.is_main,
                             tensorboard=cfg.logging.tensorboard)  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, loss: float) -> None:
        """Write ``checkpoint-last.pth`` atomically (every rank calls: RNG states are gathered)."""
        rngs = gather_rng_states()
        waiting = gather_objects(self.packer.state_dict())
        if not self.dist.is_main:
            return
        obj = {name: _prefixed(getattr(self, name)) for name in SUBMODULES}
        obj.update(
            opt=self.optimizer.state_dict(), scaler=None, epoch=self.epoch, loss=loss,
            batch_size=self.cfg.data.batch_size, world_size=self.dist.world_size,
            lr=self.cfg.optimization.lr, step=self.step, rng=rngs,
            target_norm=self.target_norm.state_dict(), config=to_dict(self.cfg),
            packing_waiting=waiting,
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
        restore_rng_states(obj["rng"], self.dist.rank, self.ckpt_path)
        waiting = obj.get("packing_waiting") or []
        if self.dist.rank < len(waiting):
            self.packer.load_state_dict(waiting[self.dist.rank])
        elif any(w["keys"] for w in waiting):
            logger.warning("%s: saved with %d ranks; rank %d starts with no carried-over images",
                           self.ckpt_path, len(waiting), self.dist.rank)  # fmt: skip
        logger.info("resumed from %s: epoch %d, step %d", self.ckpt_path, self.epoch, self.step)

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
            masks_enc, masks_pred, m.pred_capacity, m.pred_repeats, m.pred_replacement
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
        if not math.isfinite(loss_value):
            last = (f"{self.ckpt_path} (epoch {self.epoch})" if self.ckpt_path.exists()
                    else "none written yet")  # fmt: skip
            raise TrainingDiverged(
                f"loss is {loss_value} at step {self.step} (epoch {self.epoch}); stopping before "
                f"the update. Last good checkpoint: {last}"
            )
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
            normed = self.target_norm(tokens)
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
                self.cfg.model.tome_rates,
            )  # fmt: skip
            target = self.target_norm(tokens[:, n_ctx:])
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
        metrics: dict = {}
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
                if self.step % cfg.logging.log_freq == 0 or "rankme" in row:
                    self.log.log(self.step, epoch=self.epoch, **row)
            self.epoch += 1
            metrics = {"loss": sum(losses) / len(losses), **self.probes()}
            seconds = time.time() - start
            extra = {k: v for k, v in metrics.items() if k != "loss"}
            self.log.log(self.step, epoch=self.epoch, epoch_loss=metrics["loss"],
                         epoch_seconds=seconds, **extra)  # fmt: skip
            logger.info("epoch %d/%d: loss %.4f (%.1fs) %s", self.epoch, epochs, metrics["loss"],
                        seconds, extra)  # fmt: skip
            if self.epoch % cfg.logging.checkpoint_freq == 0 or self.epoch == epochs:
                self.save(metrics["loss"])
        return {**initial, **metrics}


def pretrain(cfg: PretrainConfig, dist_info: DistInfo) -> dict:
    """Run (or resume) a pretraining; writes config, logs, checkpoint and ``results.json``."""
    logger.info("pretraining %s", describe(cfg))
    trainer = Pretrainer(cfg, dist_info)
    if dist_info.is_main:
        save_config(cfg, trainer.folder)
    if cfg.meta.resume:
        trainer.log.skip_logged()  # rows of a killed attempt are not written twice
        if trainer.ckpt_path.exists():
            trainer.resume()
    try:
        metrics = trainer.run()
    finally:
        trainer.log.close()
    if dist_info.is_main:
        write_results(trainer.folder, "pretrain", metrics, epochs=trainer.epoch,
                      steps=trainer.step, checkpoint=str(trainer.ckpt_path),
                      model=dataclasses.asdict(trainer.encoder.arch))  # fmt: skip
    return metrics


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
