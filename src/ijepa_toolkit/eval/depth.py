"""Depth probe on a frozen encoder (``depth_eval.py``): train a linear / bins head, evaluate.

Every protocol choice (crop, valid range, averaging, flip test-time augmentation, blocks, head,
loss) is a config key, printed at start and stored under ``settings`` in ``results.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from ..build import build_encoder
from ..checkpoint import CheckpointError, CheckpointWriteError
from ..config import (
    ConfigError,
    EncoderSection,
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
    require,
    save_config,
    to_dict,
)
from ..data.nyu import DepthDataError, DepthPairs, build_depth_reader
from ..engine.distributed import resolve_device
from ..engine.logger import RunLogger, setup_console_logging, write_results
from ..engine.resume import LAST, load_training_state, save_training_state
from ..engine.utils import autocast, progress, seed_everything
from ..models.depth_head import DepthHead, dense_features, resolve_blocks
from .depth_metrics import CROPS, EIGEN_CROP, EIGEN_SIZE, DepthMetricMeter, crop_box, valid_mask

logger = logging.getLogger("ijepa_toolkit")


@dataclasses.dataclass
class DepthDataSection:
    """Where the data is and how it is fed. Depth is in metres after ``depth_scale``."""

    format: str = "folder"  # mat | folder | tar
    root: str = "data/nyu"  # mat: the labeled .mat file; folder: image root; tar: shard folder
    test_root: Optional[str] = None  # folder / tar: root of the test split (default: root)
    train_split: str = "nyu_train.txt"  # mat: splits.mat or index list; tar: glob of shards
    test_split: str = "nyu_test.txt"  # relative split paths are taken under the split's root
    depth_scale: Optional[float] = None  # metres per stored unit; None: mat/tar 1, PNG 1e-3
    min_depth: float = 1e-3  # valid ground truth: min_depth < gt < max_depth (metres)
    max_depth: float = 10.0
    crop_size: list[int] = dataclasses.field(default_factory=lambda: [416, 544])  # train crop
    flip: bool = True  # random horizontal flip in training
    input_scale: float = 1.0  # encoder input = frame (or crop) x scale, rounded down to patch
    num_workers: int = 4


@dataclasses.dataclass
class ProbeSection:
    features: str = "four"  # last | four
    blocks: Optional[list[int]] = None  # four: 0-based indices; None: DINOv2's per depth
    pooled_token: bool = True  # broadcast each block's mean token and concatenate it
    final_norm: bool = True  # pass each block's tokens through the encoder's final norm
    head: str = "linear"  # linear (log-depth regression) | bins (DINOv2 linear depth head)
    n_bins: int = 256
    batchnorm: bool = True
    upsample: int = 4  # bilinear upsampling of the head's output before the nonlinearity


@dataclasses.dataclass
class DepthLossSection:
    silog_lambda: float = 0.85  # sqrt(mean(d^2) - lambda * mean(d)^2), d = log pred - log gt
    gradient_weight: float = 0.5  # multi-scale log-depth gradient loss; 0 disables it
    gradient_scales: int = 4


@dataclasses.dataclass
class DepthOptimSection:
    epochs: int = 25
    batch_size: int = 8
    lr: float = 3e-4  # AdamW, linear warmup then cosine to min_lr, per iteration
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-2
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])


@dataclasses.dataclass
class DepthEvalSection:
    crop: str = "eigen"  # eigen ([45:471, 41:601] on 480x640) | none
    flip_tta: bool = False  # average the prediction with that of the flipped image
    clamp: bool = True  # clamp predictions to [min_depth, max_depth] before the metrics
    batch_size: int = 1  # > 1 needs test images of one size
    every: int = 0  # evaluate every N epochs (0: only at the end)
    visualisations: int = 4  # side-by-side PNGs (input | ground truth | prediction)


@dataclasses.dataclass
class DepthConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: DepthDataSection = dataclasses.field(default_factory=DepthDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    probe: ProbeSection = dataclasses.field(default_factory=ProbeSection)
    loss: DepthLossSection = dataclasses.field(default_factory=DepthLossSection)
    optimization: DepthOptimSection = dataclasses.field(default_factory=DepthOptimSection)
    eval: DepthEvalSection = dataclasses.field(default_factory=DepthEvalSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def silog_loss(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, lam: float = 0.85
) -> torch.Tensor:
    """Scale-invariant log loss over the masked pixels of the batch (Eigen et al. 2014).

    ``sqrt(mean(d^2) - lam * mean(d)^2)``, ``d = log(pred) - log(gt)``; (B, 1, H, W) inputs.
    """
    d = torch.log(pred[mask]) - torch.log(gt[mask])
    return torch.sqrt((d.pow(2).mean() - lam * d.mean().pow(2)).clamp_min(1e-12))


def gradient_loss(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, scales: int = 4
) -> torch.Tensor:
    """Multi-scale gradient matching of the log-depth error (Li & Snavely, MegaDepth 2018).

    At scales 1, 2, 4, ... the error ``r = log pred - log gt`` is subsampled, and the absolute
    differences of horizontal and vertical neighbours (both valid) are summed, divided by the
    number of valid pixels at that scale. (B, 1, H, W) inputs.
    """
    r = torch.where(mask, torch.log(pred) - torch.log(gt.clamp_min(1e-6)), torch.zeros_like(pred))
    total = pred.new_zeros(())
    for s in range(scales):
        step = 2**s
        rs, ms = r[..., ::step, ::step], mask[..., ::step, ::step]
        mv = ms[..., 1:, :] & ms[..., :-1, :]
        mh = ms[..., :, 1:] & ms[..., :, :-1]
        gv = (rs[..., 1:, :] - rs[..., :-1, :]).abs()[mv].sum()
        gh = (rs[..., :, 1:] - rs[..., :, :-1]).abs()[mh].sum()
        total = total + (gv + gh) / ms.sum().clamp_min(1)
    return total


class DepthProbe(nn.Module):
    """Frozen encoder + depth head; only ``head`` has trainable parameters and is checkpointed."""

    def __init__(self, encoder: nn.Module, cfg: DepthConfig):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        p = cfg.probe
        self.blocks = resolve_blocks(p.features, p.blocks, len(encoder.blocks))
        self.pooled_token, self.final_norm = p.pooled_token, p.final_norm
        self.use_bf16 = cfg.meta.use_bfloat16
        width = len(self.blocks) * encoder.embed_dim * (2 if p.pooled_token else 1)
        self.head = DepthHead(width, p.head, cfg.data.min_depth, cfg.data.max_depth, p.n_bins,
                              p.batchnorm, p.upsample)  # fmt: skip

    def train(self, mode: bool = True) -> DepthProbe:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, ever
        return self

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """(B, 3, h, w) normalised images -> (B, 1, *out_size) depth in metres."""
        with torch.no_grad(), autocast(x.device, self.use_bf16):
            feats = dense_features(self.encoder, x, self.blocks, self.pooled_token, self.final_norm)
        return self.head(feats.float(), out_size)


def protocol_settings(cfg: DepthConfig, probe: DepthProbe, patch_size: int) -> dict:
    """Every choice that changes the numbers, as stored in ``results.json``."""
    d, e = cfg.data, cfg.eval
    crop = {
        "eigen": f"rows {EIGEN_CROP[0]}:{EIGEN_CROP[1]}, cols {EIGEN_CROP[2]}:{EIGEN_CROP[3]} "
        f"of {EIGEN_SIZE[0]}x{EIGEN_SIZE[1]} (same fractions on other sizes)",
        "none": "none",
    }.get(e.crop, e.crop)
    return {
        "dataset": {"format": d.format, "root": d.root, "test_root": d.test_root,
                    "train_split": d.train_split, "test_split": d.test_split,
                    "depth_scale": d.depth_scale},
        "eval_crop": crop,
        "valid_depth": f"{d.min_depth} < gt < {d.max_depth} m",
        "averaging": "metrics per image over its valid pixels, then mean over images",
        "silog": "100 * sqrt(mean(e^2) - mean(e)^2), e = ln pred - ln gt",
        "flip_tta": e.flip_tta,
        "clamp_pred": f"[{d.min_depth}, {d.max_depth}]" if e.clamp else "no",
        "input": f"frame x {d.input_scale}, rounded down to patch {patch_size}; prediction "
        "upsampled (bilinear) to the ground truth's size",
        "train_aug": f"random crop {d.crop_size[0]}x{d.crop_size[1]}, flip={d.flip}",
        "features": {"blocks": probe.blocks, "pooled_token": cfg.probe.pooled_token,
                     "final_norm": cfg.probe.final_norm},
        "head": {"kind": cfg.probe.head, "n_bins": cfg.probe.n_bins,
                 "batchnorm": cfg.probe.batchnorm, "upsample": cfg.probe.upsample},
        "loss": dataclasses.asdict(cfg.loss),
        "optimization": dataclasses.asdict(cfg.optimization),
        "encoder": {"checkpoint": cfg.model.checkpoint, "which": cfg.model.which},
    }  # fmt: skip


COLOUR_ANCHORS = np.array(  # viridis at 0, 1/4, 1/2, 3/4, 1
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def colourise(depth: np.ndarray, lo: float, hi: float, valid: Optional[np.ndarray] = None):
    """(H, W) metres -> (H, W, 3) uint8, near = dark, far = yellow; invalid pixels black."""
    t = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    xs = np.linspace(0, 1, len(COLOUR_ANCHORS))
    rgb = np.stack([np.interp(t, xs, COLOUR_ANCHORS[:, c]) for c in range(3)], axis=-1)
    if valid is not None:
        rgb[~valid] = 0
    return rgb.round().astype(np.uint8)


def save_panel(path: Path, rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray):
    """``input | ground truth | prediction`` side by side, one colour scale (the gt's range)."""
    lo, hi = (float(gt[valid].min()), float(gt[valid].max())) if valid.any() else (0.0, 10.0)
    panel = np.concatenate([rgb, colourise(gt, lo, hi, valid), colourise(pred, lo, hi)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path)


@torch.no_grad()
def evaluate(
    probe: DepthProbe,
    loader: DataLoader,
    cfg: DepthConfig,
    device: torch.device,
    vis_dir: Optional[Path] = None,
) -> DepthMetricMeter:
    """Predict each test image (optionally flip-averaged), score it on its valid crop."""
    probe.eval()
    meter = DepthMetricMeter()
    d, e = cfg.data, cfg.eval
    shown = 0
    for batch in progress(loader, desc="eval"):
        x = batch["image"].to(device)
        gt = batch["depth"].to(device)
        size = tuple(gt.shape[-2:])
        pred = probe(x, size)
        if e.flip_tta:
            pred = (pred + probe(x.flip(-1), size).flip(-1)) / 2
        if e.clamp:
            pred = pred.clamp(d.min_depth, d.max_depth)
        crop = crop_box(e.crop, *size)
        for i, name in enumerate(batch["name"]):
            mask = valid_mask(gt[i, 0], d.min_depth, d.max_depth, crop)
            meter.update(pred[i, 0], gt[i, 0], mask, name)
            if vis_dir is not None and shown < e.visualisations:
                safe = "".join(c if c.isalnum() else "_" for c in name)[-60:]
                in_range = valid_mask(gt[i, 0], d.min_depth, d.max_depth).cpu().numpy()
                rgb, g, p = (
                    batch["rgb"][i].numpy(),
                    gt[i, 0].cpu().numpy(),
                    pred[i, 0].cpu().numpy(),
                )
                save_panel(vis_dir / f"{shown:02d}_{safe}.png", rgb, g, p, in_range)
                shown += 1
    return meter


def train_one_epoch(
    probe: DepthProbe,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: DepthConfig,
    device: torch.device,
    step: int,
    run_log: RunLogger,
) -> tuple[int, float]:
    """One pass over ``loader``; returns the new optimizer step count and the mean loss."""
    probe.train()
    losses = []
    for batch in progress(loader, desc="train"):
        x = batch["image"].to(device, non_blocking=True)
        gt = batch["depth"].to(device, non_blocking=True)
        mask = (gt > cfg.data.min_depth) & (gt < cfg.data.max_depth)
        if not bool(mask.any()):
            logger.warning("skipping a training batch without valid depth: %s", batch["name"])
            continue
        scheduler.step_update(step)
        pred = probe(x, tuple(gt.shape[-2:]))
        silog = silog_loss(pred, gt, mask, cfg.loss.silog_lambda)
        loss = silog
        grad = None
        if cfg.loss.gradient_weight > 0:
            grad = gradient_loss(pred, gt, mask, cfg.loss.gradient_scales)
            loss = loss + cfg.loss.gradient_weight * grad
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower optimization.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        if step % cfg.logging.log_freq == 0:
            extra = {"grad_loss": grad} if grad is not None else {}
            run_log.log(step, loss=loss, silog=silog, lr=optimizer.param_groups[0]["lr"], **extra)
    return step, float(np.mean(losses)) if losses else math.nan


def run(cfg: DepthConfig, resume: bool = False) -> dict:
    """Train the probe as configured, evaluate it, write the run folder; returns the results."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("error: depth_eval.py runs in one process; start it with python")
    setup_console_logging()
    d, o, ev = cfg.data, cfg.optimization, cfg.eval
    if len(d.crop_size) != 2 or min(d.crop_size) < 1:
        raise ConfigError(f"data.crop_size={d.crop_size}: expected [height, width] in pixels")
    require([  # before the encoder is built and trained, not at the evaluation after training
        ("eval.crop", ev.crop, ev.crop in CROPS, f"one of {CROPS}"),
        ("eval.batch_size", ev.batch_size, ev.batch_size >= 1, ">= 1"),
        ("optimization.batch_size", o.batch_size, o.batch_size >= 1, ">= 1"),
        ("optimization.epochs", o.epochs, o.epochs >= 0, ">= 0 (0: evaluate the untrained head)"),
        ("loss.silog_lambda", cfg.loss.silog_lambda, 0 <= cfg.loss.silog_lambda <= 1,
         "between 0 and 1 (the scale-invariant log loss)"),
    ])  # fmt: skip
    seed_everything(cfg.meta.seed)
    device = resolve_device(cfg.meta.device)
    out = Path(cfg.logging.folder)
    save_config(cfg, out)

    encoder = build_encoder(cfg.model).to(device)
    try:
        probe = DepthProbe(encoder, cfg).to(device)
    except ValueError as e:  # blocks / head / depth range settings
        raise ConfigError(str(e)) from None
    patch = encoder.patch_embed.patch_size[0]
    test_root = d.root if d.format == "mat" else (d.test_root or d.root)
    train_set = DepthPairs(
        build_depth_reader(d.format, d.root, "train", d.train_split, d.depth_scale),
        patch, d.input_scale, d.crop_size, d.flip,
    )  # fmt: skip
    test_set = DepthPairs(
        build_depth_reader(d.format, test_root, "test", d.test_split, d.depth_scale),
        patch, d.input_scale,
    )  # fmt: skip
    settings = protocol_settings(cfg, probe, patch)
    logger.info("depth protocol (%d train / %d test images):", len(train_set), len(test_set))
    for k, v in settings.items():
        logger.info("  %s: %s", k, v)

    generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=o.batch_size, shuffle=True,
                              num_workers=d.num_workers, generator=generator,
                              pin_memory=device.type == "cuda",
                              persistent_workers=d.num_workers > 0)  # fmt: skip
    test_loader = DataLoader(test_set, batch_size=cfg.eval.batch_size, num_workers=d.num_workers)
    params = list(probe.head.parameters())
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)  # fmt: skip
    iters = len(train_loader)
    warmup = round(o.warmup_epochs * iters)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(o.epochs * iters - warmup, 1),
                                  lr_min=o.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                                  warmup_prefix=True, t_in_epochs=False)  # fmt: skip
    start_epoch, step = 0, 0
    if resume:
        if (out / LAST).is_file():
            state = load_training_state(out / LAST, probe.head, optimizer)
            start_epoch, step = int(state["epoch"]), int(state["step"])
        else:
            logger.warning("--resume: no %s in %s, starting from scratch", LAST, out)
    run_log = RunLogger(out, tensorboard=cfg.logging.tensorboard)
    if resume:
        run_log.skip_logged()
    start = time.time()
    for epoch in range(start_epoch, o.epochs):
        generator.manual_seed(cfg.meta.seed * 1000 + epoch)  # same order after a resume
        step, train_loss = train_one_epoch(probe, train_loader, optimizer, scheduler, cfg, device,
                                           step, run_log)  # fmt: skip
        row = {"epoch": epoch + 1, "train_loss": train_loss}
        if cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and epoch + 1 < o.epochs:
            metrics = evaluate(probe, test_loader, cfg, device).average()
            row.update({f"test_{k}": v for k, v in metrics.items()})  # not the train "silog"
        run_log.log(step, **row)
        logger.info("epoch %d/%d: %s", epoch + 1, o.epochs,
                    ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))  # fmt: skip
        save_training_state(out / LAST, model=probe.head, optimizer=optimizer, epoch=epoch + 1,
                            step=step, config=to_dict(cfg))  # fmt: skip
    meter = evaluate(probe, test_loader, cfg, device, vis_dir=out / "visualisations")
    metrics = meter.average()
    run_log.log(step, **{f"test_{k}": v for k, v in metrics.items()})
    run_log.close()
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    logger.info("test (%d images, %d skipped: no valid depth): %s", meter.count,
                len(meter.skipped), shown)  # fmt: skip
    results = {
        "checkpoint": cfg.model.checkpoint,
        "which": cfg.model.which,
        "settings": settings,
        "images": meter.count,
        "skipped_invalid": len(meter.skipped),
        "skipped_names": meter.skipped[:20],
        "train_images": len(train_set),
        "epochs": o.epochs,
        "train_seconds": round(time.time() - start, 1),
    }
    write_results(out, "depth", metrics, **results)
    return {"protocol": "depth", "metrics": metrics, **results}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = config_parser("Depth probe (NYU-Depth v2 protocol) on a frozen I-JEPA encoder")
    parser.add_argument("--resume", action="store_true",
                        help="continue from logging.folder/checkpoint-last.pth")  # fmt: skip
    cfg, args = parse_config(DepthConfig, parser, argv)
    try:
        run(cfg, resume=args.resume)
    except (ConfigError, DepthDataError, CheckpointError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
