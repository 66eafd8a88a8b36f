"""The pretraining machinery (``train.py`` imports it when work starts): ``Pretrainer`` builds
the models, optimizer, data and mask sampler a config names and runs the training step and loop;
checkpoints in the official layout (``train.py``'s docstring).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..config import to_dict
from ..data.folder import SafeImageFolder, collate_skip_none
from ..engine.distributed import DistInfo, all_gather_cat, all_reduce_sum, barrier
from ..engine.logger import RunLogger
from ..engine.resume import LAST, gather_objects, gather_rng_states, load_part, restore_rng_states
from ..engine.utils import (
    adamw,
    amp_dtype,
    autocast,
    clip_grad_norm,
    grad_scaler,
    loader_kwargs,
    progress,
    seed_everything,
)
from ..errors import CheckpointError
from ..eval.rank import rankme
from ..io.read import read_checkpoint
from ..io.save import save_checkpoint
from ..masks.multiblock import MultiBlockMaskSampler
from ..models.diffmoe import moe_aux_loss
from ..runs import check_finite
from .data import GlobalBatchSampler, pretrain_transform, resolve_folders
from .model import (
    ContextPath,
    build_models,
    ema_update_,
    merged_packed_loss,
    prediction_loss,
    targets_at,
)
from .packing import (
    PAD,
    PackedBatch,
    PackingStream,
    encode_packed,
    packed_loss,
    per_image_mean,
    predictor_view,
    view_targets,
)
from .probes import featurenorm_lidar_probe, knn_probe, lidar_probe
from .schedules import Schedules
from .targets import TargetNorm, target_token_mask
from .token_drop import TokenDrop, sample_token_drop
from .train import PretrainConfig, check_folders, check_values

logger = logging.getLogger("ijepa_toolkit")
SUBMODULES = ("encoder", "predictor", "target_encoder")


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


def _prefixed(module: torch.nn.Module) -> dict:
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


class Pretrainer:
    """Builds everything a config names and runs (or resumes) the pretraining."""

    def __init__(self, cfg: PretrainConfig, dist_info: DistInfo, log: bool = True):
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
            cfg.model.tome_mode, encoder_registers=cfg.model.pred_encoder_registers,
        )  # fmt: skip
        self.target_norm = TargetNorm(cfg.model.target_norm, self.encoder.embed_dim).to(self.device)
        self.optimizer = adamw(
            param_groups(self.encoder, self.predictor), betas=tuple(cfg.optimization.betas)
        )
        self.scaler = grad_scaler(self.device, amp_dtype(self.device, cfg.meta.use_bfloat16))
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
        self.log = RunLogger(self.folder, enabled=dist_info.is_main and log,
                             tensorboard=cfg.logging.tensorboard)  # fmt: skip

    def _build_data(self) -> None:
        """Transform, image folder, world-size-free batch sampler, loader and the schedules."""
        cfg, dist_info = self.cfg, self.dist
        self.train_folder, self.knn_train, self.knn_val = resolve_folders(cfg.data)
        self.transform = pretrain_transform(cfg.data)
        dataset = SafeImageFolder(self.train_folder, transform=self.transform)
        self.sampler = GlobalBatchSampler(
            len(dataset), cfg.data.batch_size, dist_info.rank, dist_info.world_size, cfg.meta.seed
        )
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, collate_fn=collate_skip_none,
            **loader_kwargs(cfg.data.num_workers, self.device, cfg.data.pin_mem),
        )  # fmt: skip
        opt = cfg.optimization
        self.schedules = Schedules(
            iterations_per_epoch=len(self.sampler), epochs=opt.epochs, warmup_epochs=opt.warmup,
            start_lr=opt.start_lr, lr=opt.lr, final_lr=opt.final_lr,
            weight_decay=opt.weight_decay, final_weight_decay=opt.final_weight_decay,
            ema=tuple(opt.ema), ipe_scale=opt.ipe_scale, lr_schedule=opt.lr_schedule,
            lr_steps=tuple(opt.lr_steps), ema_schedule=opt.ema_schedule,
            ema_phases=tuple(opt.ema_phases), ema_steps=tuple(opt.ema_steps),
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
            opt=self.optimizer.state_dict(), scaler=self.scaler.state_dict() or None,
            epoch=self.epoch, loss=loss,
            batch_size=self.cfg.data.batch_size, world_size=self.dist.world_size,
            lr=self.cfg.optimization.lr, step=self.step, rng=rngs,
            target_norm=self.target_norm.state_dict(), config=to_dict(self.cfg),
            packing_waiting=waiting, metrics=self.metrics,
        )  # fmt: skip
        save_checkpoint(obj, self.ckpt_path)

    def load_models(self, obj: dict, path: Path) -> None:
        """Encoder, predictor, target encoder and target-norm statistics from checkpoint ``obj``
        (read from ``path``)."""
        for name in SUBMODULES:
            load_part(getattr(self, name), _unprefixed(obj[name]), path, name)
        load_part(self.target_norm, obj["target_norm"], path, "target_norm")

    def resume(self) -> None:
        """Restore weights, optimizer, counters, target-norm statistics and this rank's RNG."""
        obj = read_checkpoint(self.ckpt_path)
        missing = [k for k in (*SUBMODULES, "opt", "target_norm", "epoch", "step", "rng")
                   if k not in obj]  # fmt: skip
        if missing:
            raise CheckpointError(f"{self.ckpt_path}: not a resumable pretraining checkpoint "
                                  f"(missing {', '.join(missing)})")  # fmt: skip
        self.load_models(obj, self.ckpt_path)
        load_part(self.optimizer, obj["opt"], self.ckpt_path, "opt")
        if obj.get("scaler") and self.scaler.is_enabled():  # fp16 training's loss scale
            self.scaler.load_state_dict(obj["scaler"])
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
        self.scaler.unscale_(self.optimizer)  # (fp16 only; bf16 and fp32 need no scaling)
        grad_norm = float(clip_grad_norm(params, self.cfg.optimization.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
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
                self.scaler.scale(loss).backward()
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
        m = self.cfg.model
        batch.view = predictor_view(batch, m.pred_capacity, m.pred_repeats, m.pred_replacement,
                                    m.pred_window, g)  # fmt: skip
        batch = batch.to(self.device)
        if not m.tome_unmerge:  # IJEPA-Enhanced should_unmerge: false (pretrain/model.py)
            with autocast(self.device, self.cfg.meta.use_bfloat16):
                loss, tokens, gsample = merged_packed_loss(
                    self.model, self.target_encoder, self.target_norm, batch, m
                )
                loss = loss + self.moe_loss()
        else:
            tokens, target = self.packed_targets(batch)
            with autocast(self.device, self.cfg.meta.use_bfloat16):
                z = self.model(batch)
                loss = packed_loss(z, *view_targets(target, batch), self.cfg.model.loss)
                loss = loss + self.moe_loss()
            gsample = torch.cat([batch.ctx_gsample, batch.tgt_gsample], dim=1)
        self.scaler.scale(loss).backward()
        pooled = per_image_mean(tokens.float(), gsample, len(batch.grids))
        trained = torch.tensor(float(sum(len(r) for r in batch.rows)), device=self.device)
        extra = {"padding": batch.padding_rate, "images": int(all_reduce_sum(trained))}
        return loss.detach().float(), pooled, extra

    @torch.no_grad()
    def packed_targets(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The target encoder's (R, Lc + Lt, D) tokens of a packed batch (context and target
        tokens: the full images) and the normalised (R, Lt, D) targets."""
        m = self.cfg.model
        with autocast(self.device, self.cfg.meta.use_bfloat16):
            tokens = encode_packed(
                self.target_encoder, torch.cat([batch.ctx_px, batch.tgt_px], dim=1),
                torch.cat([batch.ctx_ids, batch.tgt_ids], dim=1),
                torch.cat([batch.ctx_gsample, batch.tgt_gsample], dim=1), batch.grids,
                m.target_rates(), m.tome_placement, m.tome_mode,
            )  # fmt: skip
            n_ctx = batch.ctx_ids.shape[1]
            return tokens, self.target_norm(tokens[:, n_ctx:], batch.tgt_gsample != PAD)

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
        if self.dist.is_main and due(cfg.lidar_freq):
            out.update(self.lidar())
        barrier()
        return out

    def lidar(self) -> dict:
        """``{"lidar": value}`` of the configured protocol (empty: no folder to score)."""
        cfg, m = self.cfg.logging, self.cfg.model
        images, views = cfg.lidar_counts()
        if cfg.lidar_protocol == "featurenorm":
            options = cfg.view_options(self.encoder.arch.patch_size)
            return {"lidar": featurenorm_lidar_probe(
                self.encoder, self.train_folder, options, self.device, images, views,
                self.cfg.data.batch_size, self.cfg.meta.seed, m.tome_rates,
                tome_placement=m.tome_placement, tome_mode=m.tome_mode)}  # fmt: skip
        if not self.knn_train:
            return {}
        return {"lidar": lidar_probe(self.target_encoder, self.knn_train, self.transform,
                                     self.device, images, views)}  # fmt: skip

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
