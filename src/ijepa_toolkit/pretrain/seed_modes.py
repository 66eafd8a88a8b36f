"""The featurenorm seed's analysis modes on a toolkit pretraining checkpoint.

    python -m ijepa_toolkit.pretrain.seed_modes plot-mean-loss --checkpoint CKPT \\
        data.train_folder=IMAGES logging.folder=OUT
    python -m ijepa_toolkit.pretrain.seed_modes plot-sample-losses --checkpoint CKPT \\
        data.train_folder=IMAGES
    python -m ijepa_toolkit.pretrain.seed_modes validate --checkpoint CKPT \\
        data.train_folder=TRAIN data.val_folder=VAL

As the seed's ``main.py`` modes (theAdamColton/elucidating-featurenorm-ijepa@eb093c21):
``plot-mean-loss`` (``src/eval/plot_mean_loss.py``: per-position mean of the per-token loss over
``modes.batches`` batches of fixed-size views -> ``mean_loss.json``, ``mean_loss.png``),
``plot-sample-losses`` (``src/eval/plot_sample_losses.py``: ``modes.views`` views of each of
``modes.images`` images; per image the mean and the variance of its token losses averaged over
views, a loss picture, and histograms of both over the images -> ``sample_losses.json``,
``sample-NNNN.png``, ``loss_histogram.png``, ``variance_histogram.png``) and ``validate``
(``layer_probe.py`` -> ``validate.json``, ``validate.png``). The model runs in eval mode; every
target token is predicted from the whole context (no predictor token dropping). Numbers are
written with ``io.atomic.write_json``, pictures with ``plots.py``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import plots
from ..config import LoggingSection, MetaSection, build, config_parser, parse_config, require
from ..data.folder import SafeImageFolder
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..engine.distributed import init_distributed
from ..errors import CheckpointError, ConfigError
from ..io.atomic import write_json
from ..io.read import read_checkpoint
from ..runs import run_main
from .layer_probe import layer_features, layer_probe
from .packing import PAD
from .probes import seed_images, view_batches
from .seed_views import SeedViews, View, ViewOptions, views_batch
from .train import PretrainConfig
from .trainer import Pretrainer

MODES = ("plot-mean-loss", "plot-sample-losses", "validate")  # the seed's main.py names


@dataclass
class ModesData:
    """Image folders: ``train_folder`` for the loss modes and validate's probe training,
    ``val_folder`` for validate's test."""

    train_folder: str = ""
    val_folder: str = ""
    batch_size: int = 32  # views (or images) per forward
    image_size: int = 256  # plot-mean-loss: every view's mean side; validate: centre crop side


@dataclass
class ModesSection:
    """The seed's mode settings (its defaults)."""

    checkpoint: str = ""  # a toolkit pretraining checkpoint (checkpoint-last.pth)
    batches: int = 50  # plot-mean-loss: batches of data.batch_size views
    images: int = 20  # plot-sample-losses: images
    views: int = 1000  # plot-sample-losses: views of each image
    sides: tuple[int, int] = (64, 256)  # plot-sample-losses: mean side drawn in [min, max] px
    window: int = 2  # context windows of window x window patches
    context: tuple[float, float, float] = (0.25, 0.5, 0.5)  # as pretrain logging.lidar_context
    probe_lr: float = 1e-3  # validate: AdamW lr of the per-layer probes
    probe_epochs: int = 50
    probe_batch_size: int = 2048

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        counts = ("batches", "images", "views", "window", "probe_epochs", "probe_batch_size")
        return [(k, getattr(self, k), getattr(self, k) >= 1, ">= 1") for k in counts]


@dataclass
class ModesLogging(LoggingSection):
    folder: str = "runs/seed_modes"  # the modes' JSON and PNG files go here


@dataclass
class SeedModesConfig:
    meta: MetaSection = field(default_factory=MetaSection)
    data: ModesData = field(default_factory=ModesData)
    modes: ModesSection = field(default_factory=ModesSection)
    logging: ModesLogging = field(default_factory=ModesLogging)


def open_checkpoint(cfg: SeedModesConfig) -> Pretrainer:
    """The checkpoint's models (its own config) in eval mode, reading ``data.train_folder``."""
    path = Path(cfg.modes.checkpoint)
    obj = read_checkpoint(path)
    if not isinstance(obj.get("config"), dict):
        raise CheckpointError(f"{path}: not a toolkit pretraining checkpoint (no config)")
    try:
        run = build(PretrainConfig, obj["config"], "config")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not fit this toolkit: {e}") from None
    data = dataclasses.replace(
        run.data,
        train_folder=cfg.data.train_folder,
        digits_root=None,
        knn_train_folder=None,
        knn_val_folder=None,
        num_workers=0,
    )
    logs = dataclasses.replace(run.logging, tensorboard=False)
    run = dataclasses.replace(run, data=data, meta=cfg.meta, logging=logs)
    if not run.model.tome_unmerge:
        raise ConfigError(f"{path}: the seed modes need unmerged ToMe tokens (model.tome_unmerge)")
    trainer = Pretrainer(run, init_distributed(cfg.meta.device), log=False)
    trainer.load_models(obj, path)
    for part in (trainer.context, trainer.target_encoder, trainer.target_norm):
        part.eval()
    return trainer


@torch.no_grad()
def token_losses(trainer: Pretrainer, views: list[View]) -> dict[str, torch.Tensor]:
    """Per predicted target token of ``views`` (one packed row each): ``loss`` (the training loss
    averaged over channels), ``view`` (index into ``views``), ``row`` and ``col`` (patch)."""
    batch = views_batch(views, trainer.encoder.arch.patch_size).to(trainer.device)
    _, target = trainer.packed_targets(batch)
    pred = trainer.context(batch).float()
    kind = trainer.cfg.model.loss
    loss = F.smooth_l1_loss if kind == "smooth_l1" else F.mse_loss
    per = loss(pred, target.float(), reduction="none").mean(-1)
    valid = batch.tgt_gsample != PAD
    ids = batch.tgt_ids[valid].cpu()
    return {"loss": per[valid].cpu(), "view": batch.tgt_gsample[valid].cpu(),
            "row": ids[:, 2], "col": ids[:, 3]}  # fmt: skip


def view_options(cfg: SeedModesConfig, patch: int, sides: Sequence[int]) -> ViewOptions:
    lo, hi, top = cfg.modes.context
    return ViewOptions(patch, cfg.modes.window, sides[0], sides[1], lo, hi, top)


def mean_loss_map(trainer: Pretrainer, cfg: SeedModesConfig) -> dict:
    """``plot-mean-loss``: (gh, gw) per-position mean token loss of ``modes.batches`` batches
    of one view of each image (mean side ``data.image_size``, as the seed's fixed size)."""
    patch, size = trainer.encoder.arch.patch_size, cfg.data.image_size
    options = view_options(cfg, patch, (size, size))
    n = cfg.modes.batches * cfg.data.batch_size
    pictures = seed_images(SafeImageFolder(cfg.data.train_folder), n, options, cfg.meta.seed)
    sampler = SeedViews(options, cfg.meta.seed, cfg.meta.seed + 1)
    grid = size // patch
    sums, counts = torch.zeros(grid, grid, dtype=torch.float64), torch.zeros(grid, grid)
    for views in view_batches(sampler, pictures, 1, cfg.data.batch_size):
        t = token_losses(trainer, views)
        sums.index_put_((t["row"], t["col"]), t["loss"].double(), accumulate=True)
        counts.index_put_((t["row"], t["col"]), torch.ones(len(t["loss"])), accumulate=True)
    mean = sums / counts.clamp(min=1)
    return {"mean_loss": mean.tolist(), "counts": counts.long().tolist(),
            "images": len(pictures), "image_size": size}  # fmt: skip


def sample_losses(trainer: Pretrainer, cfg: SeedModesConfig) -> tuple[dict, list]:
    """``plot-sample-losses``: per image, the mean over its views of each view's mean and
    (unbiased) variance of its token losses, and its per-position loss map (summed over views
    at each patch position, divided by the count); returns (numbers, [(first view, map)])."""
    m = cfg.modes
    options = view_options(cfg, trainer.encoder.arch.patch_size, m.sides)
    pictures = seed_images(SafeImageFolder(cfg.data.train_folder), m.images, options,
                           cfg.meta.seed)  # fmt: skip
    sampler = SeedViews(options, cfg.meta.seed, cfg.meta.seed + 1)
    side = m.sides[1] // options.patch
    means, variances = torch.zeros(len(pictures)), torch.zeros(len(pictures))
    sums, counts = torch.zeros(len(pictures), side, side), torch.zeros(len(pictures), side, side)
    first: list = []
    done = 0
    for views in view_batches(sampler, pictures, m.views, cfg.data.batch_size):
        t = token_losses(trainer, views)
        image = (t["view"] + done) // m.views
        for v in range(len(views)):
            loss = t["loss"][t["view"] == v]
            means[(v + done) // m.views] += loss.mean() / m.views
            variances[(v + done) // m.views] += loss.var() / m.views
        sums.index_put_((image, t["row"], t["col"]), t["loss"], accumulate=True)
        counts.index_put_((image, t["row"], t["col"]), torch.ones(len(image)), accumulate=True)
        first += [v for i, v in enumerate(views) if (i + done) % m.views == 0]
        done += len(views)
    maps = [crop_seen(s / c.clamp(min=1), c) for s, c in zip(sums, counts)]
    numbers = {"sample_mean_loss": means.tolist(), "sample_loss_variance": variances.tolist(),
               "images": len(pictures), "views": m.views}  # fmt: skip
    return numbers, list(zip(first, maps))


def crop_seen(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``values`` up to the last row and column with a count (the seed's loss picture spans the
    largest grid among an image's views)."""
    rows, cols = torch.nonzero(counts, as_tuple=True)
    return values[: int(rows.max()) + 1, : int(cols.max()) + 1]


def picture(view: View, loss_map: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A view's (H, W, 3) pixels in [0, 1] and a loss map resized to them (bilinear, as the
    seed's ``Resize``)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    image = (view.pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    size = image.shape[:2]
    resized = F.interpolate(loss_map[None, None].float(), size=size, mode="bilinear")[0, 0]
    return image, resized.numpy()


def write_mean_loss(trainer: Pretrainer, cfg: SeedModesConfig, out: Path) -> dict:
    numbers = mean_loss_map(trainer, cfg)
    plots.loss_heatmap(np.array(numbers["mean_loss"]), np.array(numbers["counts"]),
                       out / "mean_loss.png")  # fmt: skip
    return numbers


def write_sample_losses(trainer: Pretrainer, cfg: SeedModesConfig, out: Path) -> dict:
    numbers, pictures = sample_losses(trainer, cfg)
    means, variances = numbers["sample_mean_loss"], numbers["sample_loss_variance"]
    for i, (view, loss_map) in enumerate(pictures):
        title = f"image {i}: mean loss {means[i]:.4g}, loss variance {variances[i]:.3g}"
        plots.sample_loss_figure(*picture(view, loss_map), out / f"sample-{i:04d}.png", title)
    plots.histogram(means, out / "loss_histogram.png", "mean token loss of an image",
                    "Per-image mean loss")  # fmt: skip
    plots.histogram(variances, out / "variance_histogram.png",
                    "variance of an image's token losses", "Per-image loss variance")  # fmt: skip
    return numbers


def write_validate(trainer: Pretrainer, cfg: SeedModesConfig, out: Path) -> dict:
    numbers = validate(trainer, cfg)
    plots.layer_accuracy(numbers["accuracies"], out / "validate.png")
    return numbers


WRITERS = {"plot-mean-loss": write_mean_loss, "plot-sample-losses": write_sample_losses,
           "validate": write_validate}  # fmt: skip


def validate(trainer: Pretrainer, cfg: SeedModesConfig) -> dict:
    """``validate``: top-1 (%) of one linear probe per layer of the target encoder."""
    d, m, enc = cfg.data, cfg.modes, trainer.target_encoder
    x_tr, y_tr, classes = layer_features(enc, Path(d.train_folder), d.image_size, trainer.device)
    x_va, y_va, _ = layer_features(enc, Path(d.val_folder), d.image_size, trainer.device)
    acc = layer_probe(x_tr, y_tr, x_va, y_va, classes, m.probe_lr, m.probe_epochs,
                      m.probe_batch_size, cfg.meta.seed)  # fmt: skip
    return {"accuracies": acc, "acc@1": max(acc),
            **{f"depth{i:03d}_acc@1": a for i, a in enumerate(acc)}}  # fmt: skip


def run(mode: str, cfg: SeedModesConfig) -> dict:
    """Check the inputs (before any model is built), open the checkpoint, run ``mode``; its
    numbers go to ``logging.folder/<mode>.json`` and its pictures beside them."""
    d = cfg.data
    need = [("modes.checkpoint", cfg.modes.checkpoint), ("data.train_folder", d.train_folder)]
    if mode == "validate":
        need.append(("data.val_folder", d.val_folder))
    require([(k, v, bool(v) and Path(v).exists(), "an existing path") for k, v in need])
    out = Path(cfg.logging.folder)
    out.mkdir(parents=True, exist_ok=True)
    numbers = WRITERS[mode](open_checkpoint(cfg), cfg, out)
    write_json(numbers, out / f"{mode.removeprefix('plot-')}.json")
    return numbers


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.pretrain.seed_modes MODE --checkpoint PATH [key=value ...]``;
    returns the exit status (``runs.run_main``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in MODES else None
    parser = config_parser(f"The featurenorm seed's modes; the first argument: {' | '.join(MODES)}")
    parser.add_argument("--checkpoint", default=None, help="shortcut for modes.checkpoint")

    def work() -> None:
        cfg, args = parse_config(SeedModesConfig, parser, argv)
        if mode is None:
            raise ConfigError(f"the first argument must be a mode: one of {', '.join(MODES)}")
        if args.checkpoint:
            cfg.modes.checkpoint = args.checkpoint
        run(mode, cfg)
        print(f"{mode}: wrote into {cfg.logging.folder}")

    return run_main(work)


if __name__ == "__main__":
    raise SystemExit(main())
