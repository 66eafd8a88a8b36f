"""Depth probe on a frozen encoder (``depth_eval.py``): train a linear / bins head, evaluate.

Every protocol choice (crop, valid range, averaging, flip test-time augmentation, blocks, head,
loss) is a config key, printed at start and stored under ``settings`` in ``results.json``.
torch and the model code (the probe module: ``depth_probe.py``) are imported when work starts:
``--help``, ``--print-config`` and config errors answer without them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import numpy as np

from ..config import (
    EncoderSection,
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
    require,
    require_paths,
    save_config,
    to_dict,
)
from ..engine.distributed import resolve_device
from ..engine.logger import RunLogger, setup_console_logging
from ..engine.utils import progress, seed_everything, warmup_cosine
from ..errors import ConfigError
from ..run_folder import ALWAYS_ALLOWED, RunFolder, add_run_flags, open_run
from ..runs import check_finite, run_main, write_results

if TYPE_CHECKING:  # torch and the model code are imported when work starts
    import torch
    from torch.utils.data import DataLoader

    from ..data.nyu import DepthPairs
    from .depth_metrics import DepthMetricMeter
    from .depth_probe import DepthProbe

logger = logging.getLogger("ijepa_toolkit")
# what a --resume may change besides run_folder.ALWAYS_ALLOWED: the pictures of the final test
RESUME_ALLOWED = (*ALWAYS_ALLOWED, "eval.visualisations")


@dataclasses.dataclass
class DepthDataSection:
    """Where the data is and how it is fed. Depth is in metres after ``depth_scale``."""

    format: Literal["mat", "folder", "tar"] = "folder"
    train_folder: str = "data/nyu"  # mat: the labeled .mat file; folder: image root; tar: shards
    val_folder: Optional[str] = None  # folder / tar: root of the test split (default: train_folder)
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
    features: Literal["last", "four"] = "four"
    blocks: Optional[list[int]] = None  # four: 0-based indices; None: DINOv2's per depth
    pooled_token: bool = True  # broadcast each block's mean token and concatenate it
    final_norm: bool = True  # pass each block's tokens through the encoder's final norm
    head: Literal["linear", "bins"] = "linear"  # log-depth regression | DINOv2 linear depth head
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
    crop: Literal["eigen", "none"] = "eigen"  # eigen: [45:471, 41:601] on 480x640
    flip_tta: bool = False  # average the prediction with that of the flipped image
    clamp: bool = True  # clamp predictions to [min_depth, max_depth]; NaN/inf: BTS's always
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
    import torch

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
    import torch

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


def protocol_settings(cfg: DepthConfig, probe: DepthProbe, patch_size: int) -> dict:
    """Every choice that changes the numbers, as stored in ``results.json``."""
    from .depth_metrics import EIGEN_CROP, EIGEN_SIZE

    d, e = cfg.data, cfg.eval
    crop = {
        "eigen": f"rows {EIGEN_CROP[0]}:{EIGEN_CROP[1]}, cols {EIGEN_CROP[2]}:{EIGEN_CROP[3]} "
        f"of {EIGEN_SIZE[0]}x{EIGEN_SIZE[1]} (same fractions on other sizes)",
        "none": "none",
    }.get(e.crop, e.crop)
    return {
        "dataset": {"format": d.format, "train_folder": d.train_folder,
                    "val_folder": test_split_root(d),
                    "train_split": d.train_split, "test_split": d.test_split,
                    "depth_scale": d.depth_scale},
        "eval_crop": crop,
        "valid_depth": f"{d.min_depth} < gt < {d.max_depth} m",
        "averaging": "metrics per image over its valid pixels, then mean over images",
        "silog": "100 * sqrt(mean(e^2) - mean(e)^2), e = ln pred - ln gt",
        "flip_tta": e.flip_tta,
        "clamp_pred": f"[{d.min_depth}, {d.max_depth}]" if e.clamp else "no",
        "nonfinite_pred": f"NaN -> {d.min_depth}, inf -> {d.max_depth} (BTS bts_eval.py)",
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
    """``input | ground truth | prediction`` side by side, one colour scale (the gt's range, with
    a colour bar in metres): ``plots.depth_figure``."""
    from ..plots import depth_figure

    depth_figure(rgb, gt, pred, valid, path, title=f"Depth probe: {path.stem}")


def evaluate(
    probe: DepthProbe,
    loader: DataLoader,
    cfg: DepthConfig,
    device: torch.device,
    vis_dir: Optional[Path] = None,
) -> DepthMetricMeter:
    """Predict each test image (optionally flip-averaged), score it on its valid crop."""
    import torch

    from .depth_metrics import DepthMetricMeter, bts_prediction, crop_box, valid_mask

    probe.eval()
    meter = DepthMetricMeter()
    d, e = cfg.data, cfg.eval
    shown = 0
    with torch.no_grad():
        for batch in progress(loader, "depth eval"):
            x = batch["image"].to(device)
            gt = batch["depth"].to(device)
            size = tuple(gt.shape[-2:])
            pred = probe(x, size)
            if e.flip_tta:
                pred = (pred + probe(x.flip(-1), size).flip(-1)) / 2
            pred, nonfinite = bts_prediction(pred, d.min_depth, d.max_depth, e.clamp)
            crop = crop_box(e.crop, *size)
            for i, name in enumerate(batch["name"]):
                mask = valid_mask(gt[i, 0], d.min_depth, d.max_depth, crop)
                meter.update(pred[i, 0], gt[i, 0], mask, name, nonfinite[i, 0])
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
    last_good: Optional[Path] = None,
) -> tuple[int, float]:
    """One pass over ``loader``; returns the new optimizer step count and the mean loss.

    A NaN/inf loss stops before its update: ``TrainingDiverged`` naming ``last_good``."""
    probe.train()
    losses = []
    bar = progress(loader, "depth train")
    for batch in bar:
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
        check_finite(loss.item(), f"step {step + 1}", last_good)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.set(loss=losses[-1], lr=optimizer.param_groups[0]["lr"])
        if step % cfg.logging.log_freq == 0:
            extra = {"grad_loss": grad} if grad is not None else {}
            run_log.log(step, loss=loss, silog=silog, lr=optimizer.param_groups[0]["lr"], **extra)
    return step, float(np.mean(losses)) if losses else float("nan")


def test_split_root(d: DepthDataSection) -> str:
    """Where the test split is: the ``.mat`` file itself, else ``val_folder`` (or
    ``train_folder`` when unset)."""
    return d.train_folder if d.format == "mat" else (d.val_folder or d.train_folder)


def check_config(cfg: DepthConfig) -> None:
    """Cheap checks, before the encoder is built and trained (not at the evaluation after)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("depth_eval.py runs in one process; start it with python, not torchrun")
    d, o, ev = cfg.data, cfg.optimization, cfg.eval
    if len(d.crop_size) != 2 or min(d.crop_size) < 1:
        raise ConfigError(f"data.crop_size={d.crop_size}: expected [height, width] in pixels")
    require([
        ("eval.batch_size", ev.batch_size, ev.batch_size >= 1, ">= 1"),
        ("optimization.batch_size", o.batch_size, o.batch_size >= 1, ">= 1"),
        ("optimization.epochs", o.epochs, o.epochs >= 0, ">= 0 (0: evaluate the untrained head)"),
        ("loss.silog_lambda", cfg.loss.silog_lambda, 0 <= cfg.loss.silog_lambda <= 1,
         "between 0 and 1 (the scale-invariant log loss)"),
    ])  # fmt: skip
    kind = "file" if d.format == "mat" else "folder"
    require_paths([("data.train_folder", d.train_folder, kind),
                   ("data.val_folder", test_split_root(d), kind)])  # fmt: skip


@dataclasses.dataclass
class DepthData:
    train: DepthPairs  # random crops and flips
    test: DepthPairs  # whole frames
    train_loader: DataLoader
    test_loader: DataLoader
    generator: torch.Generator  # the training loader's shuffle, seeded per epoch


def build_data(cfg: DepthConfig, patch: int, device: torch.device) -> DepthData:
    """Train and test pairs of ``data.format`` and their loaders."""
    import torch
    from torch.utils.data import DataLoader

    from ..data.nyu import DepthPairs, build_depth_reader

    d, o = cfg.data, cfg.optimization
    train = DepthPairs(
        build_depth_reader(d.format, d.train_folder, "train", d.train_split, d.depth_scale),
        patch, d.input_scale, d.crop_size, d.flip,
    )  # fmt: skip
    test = DepthPairs(
        build_depth_reader(d.format, test_split_root(d), "test", d.test_split, d.depth_scale),
        patch, d.input_scale,
    )  # fmt: skip
    generator = torch.Generator()
    train_loader = DataLoader(train, batch_size=o.batch_size, shuffle=True,
                              num_workers=d.num_workers, generator=generator,
                              pin_memory=device.type == "cuda",
                              persistent_workers=d.num_workers > 0)  # fmt: skip
    test_loader = DataLoader(test, batch_size=cfg.eval.batch_size, num_workers=d.num_workers)
    return DepthData(train, test, train_loader, test_loader, generator)


def build_probe(cfg: DepthConfig, device: torch.device) -> DepthProbe:
    from ..build import build_encoder
    from .depth_probe import DepthProbe

    encoder = build_encoder(cfg.model).to(device)
    try:
        return DepthProbe(encoder, cfg).to(device)
    except ValueError as e:  # blocks / head / depth range settings
        raise ConfigError(str(e)) from None


def train_epochs(
    probe: DepthProbe,
    data: DepthData,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: DepthConfig,
    run_log: RunLogger,
    start_epoch: int = 0,
    step: int = 0,
    last_good: Optional[Path] = None,
) -> int:
    """Epochs ``start_epoch..epochs``: train, evaluate every ``eval.every``, log, checkpoint.

    Returns the optimizer step count."""
    from ..engine.resume import LAST, save_training_state

    o, device, out = (
        cfg.optimization,
        next(probe.head.parameters()).device,
        Path(cfg.logging.folder),
    )
    for epoch in range(start_epoch, o.epochs):
        data.generator.manual_seed(cfg.meta.seed * 1000 + epoch)  # same order after a resume
        step, train_loss = train_one_epoch(probe, data.train_loader, optimizer, scheduler, cfg,
                                           device, step, run_log, last_good)  # fmt: skip
        row = {"epoch": epoch + 1, "train_loss": train_loss}
        if cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and epoch + 1 < o.epochs:
            metrics = evaluate(probe, data.test_loader, cfg, device).average()
            row.update({f"test_{k}": v for k, v in metrics.items()})  # not the train "silog"
        run_log.log(step, **row)
        logger.info("epoch %d/%d: %s", epoch + 1, o.epochs,
                    ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))  # fmt: skip
        save_training_state(out / LAST, model=probe.head, optimizer=optimizer, epoch=epoch + 1,
                            step=step, config=to_dict(cfg))  # fmt: skip
        last_good = out / LAST
    return step


def run(cfg: DepthConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the probe as configured, evaluate it, write the run folder; returns the results.

    The run owns ``logging.folder`` (``run_folder.open_run``): another run's outputs need
    ``resume`` or ``overwrite``; a resume with changed settings is refused."""
    check_config(cfg)
    own = open_run(cfg.logging.folder, cfg, resume=resume, overwrite=overwrite,
                   allowed=RESUME_ALLOWED)  # fmt: skip
    with own:
        return _run(cfg, own)


def _run(cfg: DepthConfig, own: RunFolder) -> dict:
    import torch

    from ..engine.resume import load_training_state

    out, o, start = own.path, cfg.optimization, own.start
    setup_console_logging()
    seed_everything(cfg.meta.seed)
    device = resolve_device(cfg.meta.device)
    probe = build_probe(cfg, device)
    patch = probe.encoder.patch_embed.patch_size[0]
    data = build_data(cfg, patch, device)
    save_config(cfg, out)  # after every check that can fail: no stray config.yaml
    settings = protocol_settings(cfg, probe, patch)
    logger.info("depth protocol (%d train / %d test images):", len(data.train), len(data.test))
    for k, v in settings.items():
        logger.info("  %s: %s", k, v)
    optimizer = torch.optim.AdamW(probe.head.parameters(), lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)  # fmt: skip
    scheduler = warmup_cosine(optimizer, o.epochs, len(data.train_loader), o.warmup_epochs,
                              o.min_lr)  # fmt: skip
    start_epoch, step = 0, 0
    if start is not None:
        state = load_training_state(start, probe.head, optimizer)
        start_epoch, step = int(state["epoch"]), int(state["step"])
    run_log = RunLogger(out, tensorboard=cfg.logging.tensorboard)
    own.resumed(run_log, step if start is not None else -1)
    began = time.time()
    step = train_epochs(probe, data, optimizer, scheduler, cfg, run_log, start_epoch, step, start)
    return finish(probe, data, cfg, run_log, step, settings, time.time() - began)


def finish(
    probe: DepthProbe,
    data: DepthData,
    cfg: DepthConfig,
    run_log: RunLogger,
    step: int,
    settings: dict,
    seconds: float,
) -> dict:
    """Evaluate on the test split (with visualisations), log, write ``results.json``."""
    from ..engine.resume import LAST

    out = Path(cfg.logging.folder)
    device = next(probe.head.parameters()).device
    meter = evaluate(probe, data.test_loader, cfg, device, vis_dir=out / "visualisations")
    metrics = meter.average()
    run_log.log(step, **{f"test_{k}": v for k, v in metrics.items()})
    run_log.close()
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    logger.info("test (%d images, %d skipped: no valid depth): %s", meter.count,
                len(meter.skipped), shown)  # fmt: skip
    extra = {
        "images": meter.count,
        "skipped_invalid": len(meter.skipped),
        "skipped_names": meter.skipped[:20],
        "nonfinite_pred_pixels": meter.nonfinite_pixels,
        "nonfinite_pred_images": meter.nonfinite_images,
        "train_images": len(data.train),
        "epochs": cfg.optimization.epochs,
        "train_seconds": round(seconds, 1),
    }
    written = str(out / LAST) if (out / LAST).is_file() else None
    write_results(out, "depth", metrics, encoder_checkpoint=cfg.model.checkpoint,
                  which=cfg.model.which, output_checkpoint=written, settings=settings,
                  **extra)  # fmt: skip
    return {"protocol": "depth", "metrics": metrics, "settings": settings, **extra}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``depth_eval.py --fname CFG [--resume | --overwrite] [key=value ...]``; returns the exit
    status (``runs.run_main``: bad input 2, a diverged loss 1)."""
    parser = config_parser("Depth probe (NYU-Depth v2 protocol) on a frozen I-JEPA encoder")
    add_run_flags(parser)

    def work() -> None:
        cfg, args = parse_config(DepthConfig, parser, argv)
        run(cfg, resume=args.resume, overwrite=args.overwrite)

    return run_main(work)


if __name__ == "__main__":
    raise SystemExit(main())
