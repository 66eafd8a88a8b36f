"""Pictures of what an encoder computes: PCA of patch features, per-patch prediction loss.

``visualize.py pca``: the patch tokens of each image (``encoder.forward_features``) projected on
their 3 principal components (fitted over all images' patches together) and shown as RGB next to
the image. ``visualize.py losses``: the I-JEPA prediction loss of every patch, averaged over many
random maskings (one target block with the rest as context, or I-JEPA's multi-block masks), as a
heat map next to the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from .config import (
    EncoderSection,
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
)
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, transform_checks
from .engine.distributed import resolve_device
from .engine.logger import setup_console_logging
from .errors import ConfigError, UserError
from .eval.depth import colourise
from .plots import image_figure, loss_curve
from .runs import run_main

if TYPE_CHECKING:  # torch and the model code are imported when a command starts
    import torch

logger = logging.getLogger("ijepa_toolkit")
GAP = 2  # white pixels between panels
MIN_PANEL = 128  # panels smaller than this are upscaled (nearest) by an integer factor


@dataclasses.dataclass
class VizDataSection:
    val_folder: str = "runs/data/digits/val"  # ImageFolder; ``count`` images evenly spaced
    img_size: int = 224
    crop_ratio: float = 0.875  # eval transform: resize to img_size / crop_ratio, center crop
    count: int = 8

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        count_ok = ("count", self.count, self.count >= 1, ">= 1")
        return [*transform_checks(self.img_size, self.crop_ratio), count_ok]


@dataclasses.dataclass
class LossesSection:
    maskings: int = 64  # random maskings per image
    # block: one target block, every other patch is context (how predictable each patch is from
    # the rest); multiblock: I-JEPA's training masks (num_targets blocks, a context block of
    # context_scale with the targets removed), drawn by the pretraining sampler
    masking: Literal["block", "multiblock"] = "block"
    target_scale: list[float] = dataclasses.field(default_factory=lambda: [0.15, 0.2])
    aspect_ratio: list[float] = dataclasses.field(default_factory=lambda: [0.75, 1.5])
    num_targets: int = 4  # multiblock only
    context_scale: list[float] = dataclasses.field(default_factory=lambda: [0.85, 1.0])
    min_keep: int = 4  # multiblock only: context patches at least


@dataclasses.dataclass
class VizConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    data: VizDataSection = dataclasses.field(default_factory=VizDataSection)
    losses: LossesSection = dataclasses.field(default_factory=LossesSection)
    logging: LoggingSection = dataclasses.field(
        default_factory=lambda: LoggingSection(folder="runs/visualize")
    )


def load_images(data: VizDataSection) -> torch.Tensor:
    """(B, 3, S, S) normalised images: ``count`` of the folder, evenly spaced over its classes."""
    import torch

    from .data.folder import SafeImageFolder

    tf = eval_transform(data.img_size, data.crop_ratio)
    ds = SafeImageFolder(data.val_folder, transform=tf)
    picks = np.unique(np.linspace(0, len(ds) - 1, max(data.count, 1)).round().astype(int))
    items = [ds[int(i)] for i in picks]
    images = [item[0] for item in items if item is not None]
    if not images:
        raise FileNotFoundError(
            f"{data.val_folder}: no readable image among the {len(picks)} picked"
        )
    return torch.stack(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) ImageNet-normalised -> (B, S, S, 3) uint8, what the model saw."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)
    return (rgb.numpy() * 255).round().astype(np.uint8)


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """(M, D) features -> (M, 3) uint8: the first 3 principal components as R, G, B.

    Each component is min-max scaled between its 1st and 99th percentile over the M rows.
    """
    from sklearn.decomposition import PCA

    if tokens.shape[0] < 3 or tokens.shape[1] < 3:
        raise ValueError(f"PCA to 3 components needs >= 3 tokens of >= 3 dims, got {tokens.shape}")
    proj = PCA(n_components=3, svd_solver="full").fit_transform(tokens.astype(np.float64))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    scaled = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return (scaled * 255).round().astype(np.uint8)


def upscale(img: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3), nearest neighbour: one patch is one flat square."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))


def panel_size(img_size: int) -> int:
    """Side of each square panel: the image size times the smallest factor reaching 128 px."""
    return img_size * max(1, math.ceil(MIN_PANEL / img_size))


def compose(rows: Sequence[Sequence[np.ndarray]]) -> Image.Image:
    """Rows of equal (P, P, 3) uint8 panels, ``GAP`` white pixels between them (a short row is
    filled with white): ``torchvision.utils.make_grid`` without its outer border."""
    import torch
    from torchvision.utils import make_grid

    cols = max(len(r) for r in rows)
    blank = np.full_like(rows[0][0], 255)
    panels = [torch.from_numpy(np.array(panel)).permute(2, 0, 1)
              for row in rows for panel in [*row, *[blank] * (cols - len(row))]]  # fmt: skip
    if len(panels) == 1:  # make_grid returns a lone image unpadded
        return Image.fromarray(np.asarray(rows[0][0]))
    grid = make_grid(torch.stack(panels), nrow=cols, padding=GAP, pad_value=255)
    return Image.fromarray(grid[:, GAP:-GAP, GAP:-GAP].permute(1, 2, 0).numpy())


def grid_of(encoder: torch.nn.Module, img_size: int) -> tuple[int, int]:
    patch = encoder.patch_embed.patch_size
    return img_size // patch[0], img_size // patch[1]


def pca_panels(encoder: torch.nn.Module, images: torch.Tensor) -> list[list[np.ndarray]]:
    """Per image: [image, PCA of its patch tokens], both (P, P, 3) uint8."""
    import torch

    with torch.no_grad():
        h, w = grid_of(encoder, images.shape[-1])
        tokens = encoder.forward_features(images)[:, encoder.num_prefix_tokens :]  # (B, N, D)
        b, n, d = tokens.shape
        colours = pca_rgb(tokens.reshape(b * n, d).float().cpu().numpy()).reshape(b, h, w, 3)
        size = panel_size(images.shape[-1])
        return [[upscale(img, size), upscale(c, size)] for img, c in zip(to_uint8(images), colours)]


def sample_block(
    grid: tuple[int, int], scale: Sequence[float], aspect: Sequence[float], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random target block (``scale`` of the patches, ``aspect`` h/w) and the other patches.

    Returns (Kt,) target and (Kc,) context indices, row-major, both non-empty.
    """
    import torch

    from .masks.block import place_block

    h, w = grid
    if h * w < 2:
        raise ValueError(f"a {h}x{w} patch grid has no room for both a target and a context")
    u = torch.rand(2, generator=g).tolist()
    area = (scale[0] + u[0] * (scale[1] - scale[0])) * h * w
    ar = aspect[0] + u[1] * (aspect[1] - aspect[0])
    bh = min(max(round(math.sqrt(area * ar)), 1), h)
    bw = min(max(round(math.sqrt(area / ar)), 1), w if bh < h else w - 1)
    return place_block(grid, (bh, bw), g)


def maskings(grid: tuple[int, int], b: int, cfg: LossesSection, seed: int):
    """``cfg.maskings`` draws of ``(context (B, Kc), [targets (B, Kt), ...])`` index tensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if cfg.masking == "block":
        for _ in range(cfg.maskings):
            tgt, ctx = sample_block(grid, cfg.target_scale, cfg.aspect_ratio, g)
            yield ctx.expand(b, -1), [tgt.expand(b, -1)]
        return
    from .masks.multiblock import MaskSection, MultiBlockMaskSampler

    mask = MaskSection(
        enc_mask_scale=tuple(cfg.context_scale), pred_mask_scale=tuple(cfg.target_scale),
        aspect_ratio=tuple(cfg.aspect_ratio), num_pred_masks=cfg.num_targets,
        min_keep=cfg.min_keep,
    )  # fmt: skip
    sampler = MultiBlockMaskSampler(grid, mask)
    for step in range(cfg.maskings):
        enc, pred = sampler.sample(b, step, g)
        yield enc[0], pred


def patch_losses(
    context_encoder: torch.nn.Module,
    target_encoder: torch.nn.Module,
    predictor: torch.nn.Module,
    images: torch.Tensor,
    cfg: LossesSection,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean I-JEPA loss of each patch over ``cfg.maskings`` random maskings (``cfg.masking``).

    Targets are the layer-normalised target-encoder tokens and the loss the official smooth L1,
    averaged over the feature dimension. Returns (B, h, w) mean losses (NaN where a patch was never
    a target) and (B, h, w) counts of the target blocks that covered each patch.
    """
    import torch
    import torch.nn.functional as F

    from .models.vit import apply_masks, encode_masked

    with torch.no_grad():
        grid = grid_of(target_encoder, images.shape[-1])
        b, n = images.shape[0], grid[0] * grid[1]
        h = target_encoder.forward_features(images)[:, target_encoder.num_prefix_tokens :]
        h = F.layer_norm(h, (h.shape[-1],))
        sums, counts = torch.zeros(b, n), torch.zeros(b, n)
        for ctx, targets in maskings(grid, b, cfg, seed):
            z = encode_masked(context_encoder, images, ctx)
            for tgt in targets:
                pred = predictor(z, ctx, tgt)  # (B, Kt, D)
                loss = F.smooth_l1_loss(pred, apply_masks(h, tgt), reduction="none").mean(-1)
                sums.scatter_add_(1, tgt.cpu(), loss.float().cpu())
                counts.scatter_add_(1, tgt.cpu(), torch.ones(tgt.shape))
        mean = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.nan))
        return mean.view(b, *grid), counts.view(b, *grid)


def loss_panels(losses: torch.Tensor, images: torch.Tensor) -> list[list[np.ndarray]]:
    """Per image: [image, heat map of its patch losses] (viridis, own min..max; unseen black)."""
    size = panel_size(images.shape[-1])
    rows = []
    for img, loss in zip(to_uint8(images), losses.numpy()):
        valid = np.isfinite(loss)
        lo, hi = (float(loss[valid].min()), float(loss[valid].max())) if valid.any() else (0, 1)
        heat = colourise(np.nan_to_num(loss), lo, hi, valid)
        rows.append([upscale(img, size), upscale(heat, size)])
    return rows


def _setup(argv: Optional[Sequence[str]], what: str) -> tuple[VizConfig, torch.device, Path]:
    cfg, _ = parse_config(VizConfig, config_parser(what), argv)
    setup_console_logging()
    out = Path(cfg.logging.folder)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, resolve_device(cfg.meta.device), out


def pca(argv: Optional[Sequence[str]] = None) -> Path:
    """``visualize.py pca``: writes ``<logging.folder>/pca.png`` (the panels with a title and
    a caption) and ``pca_grid.png`` (the panels alone, pixel for pixel); returns the first."""
    from .build import build_encoder

    cfg, device, out = _setup(argv, "PCA of patch features (3 components as RGB) next to images")
    encoder = build_encoder(cfg.model).to(device)
    images = load_images(cfg.data).to(device)
    path, grid = out / "pca.png", compose(pca_panels(encoder, images))
    grid.save(out / "pca_grid.png")
    h, w = grid_of(encoder, cfg.data.img_size)
    caption = (f"Left: each input image ({cfg.data.img_size} px). Right: its {h}x{w} patch tokens "
               f"projected on the first 3 principal components (as R, G, B; PCA fitted jointly "
               f"over the {len(images)} images' patches, each component scaled between its 1st "
               f"and 99th percentile). Similar colours = similar features.")  # fmt: skip
    image_figure(np.asarray(grid), path, "PCA of patch features", caption)
    print(f"{path}: {len(images)} images | PCA of {h}x{w} patch tokens (fitted jointly)")
    return path


def losses(argv: Optional[Sequence[str]] = None) -> Path:
    """``visualize.py losses``: writes ``<logging.folder>/losses.png`` (the panels with a title and
    a caption) and ``losses_grid.png`` (the panels alone, pixel for pixel); returns the first."""
    import torch

    from .loader import load_encoder, load_predictor

    cfg, device, out = _setup(argv, "Per-patch I-JEPA prediction loss over random maskings")
    m = cfg.model
    if not m.checkpoint:
        raise ConfigError("losses needs model.checkpoint: an I-JEPA checkpoint with a predictor")
    ctx_enc = load_encoder(m.checkpoint, which="encoder", num_heads=m.num_heads).to(device)
    tgt_enc = load_encoder(m.checkpoint, which="target_encoder", num_heads=m.num_heads).to(device)
    predictor = load_predictor(m.checkpoint, num_heads=m.num_heads).to(device)
    images = load_images(cfg.data).to(device)
    mean, counts = patch_losses(ctx_enc, tgt_enc, predictor, images, cfg.losses, cfg.meta.seed)
    path, grid = out / "losses.png", compose(loss_panels(mean, images))
    grid.save(out / "losses_grid.png")
    caption = (f"Left: each input image. Right: the mean I-JEPA prediction loss (smooth L1) of "
               f"each patch as a target over {cfg.losses.maskings} '{cfg.losses.masking}' "
               f"maskings; viridis from the image's own minimum (dark) to maximum (yellow); "
               f"black: never a target.")  # fmt: skip
    image_figure(np.asarray(grid), path, "Per-patch prediction loss", caption)
    per_image = ", ".join(f"{v:.4f}" for v in torch.nanmean(mean.flatten(1), 1).tolist())
    print(
        f"{path}: {len(images)} images x {cfg.losses.maskings} maskings; each patch a target "
        f"{int(counts.min())}-{int(counts.max())} times; mean loss per image: {per_image}"
    )
    return path


def masks(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """``visualize.py masks --fname pretrain/X``: one PNG per mask-sampler step."""
    import torch

    from .data.folder import SafeImageFolder
    from .masks.multiblock import MultiBlockMaskSampler
    from .masks.render import CAPTION, legend, render_masks
    from .pretrain.data import resolve_folders
    from .pretrain.model import encoder_arch
    from .pretrain.train import PretrainConfig

    parser = config_parser("PNGs of sampled context/target masks over images")
    parser.add_argument("--steps", type=int, default=4, help="mask-sampler steps to draw")
    parser.add_argument("--images", type=int, default=8, help="images per PNG")
    parser.add_argument("--scale", type=int, default=0, help="panel zoom (0: to ~224 px)")
    parser.add_argument("--out", default=None, help="folder (default: logging.folder/masks)")
    cfg, args = parse_config(PretrainConfig, parser, argv)
    size = cfg.data.crop_size
    arch = encoder_arch(cfg.model, size)
    grid = size // arch.patch_size
    sampler = MultiBlockMaskSampler((grid, grid), cfg.mask)
    folder = resolve_folders(cfg.data)[0]
    dataset = SafeImageFolder(folder, transform=eval_transform(size, crop_ratio=1.0))
    images = torch.stack([dataset[i][0] for i in range(min(args.images, len(dataset)))])
    out = Path(args.out or Path(cfg.logging.folder) / "masks")
    out.mkdir(parents=True, exist_ok=True)
    scale = args.scale or max(1, 224 // size)
    generator = None if cfg.mask.legacy else torch.Generator().manual_seed(cfg.meta.seed)
    paths = []
    for step in range(args.steps):
        enc, pred = sampler.sample(len(images), step, generator)
        path = out / f"masks_step{step}.png"
        strip = np.asarray(render_masks(images, enc, pred, arch.patch_size, scale))
        image_figure(strip, path, f"Sampled masks, step {step} ({grid}x{grid} patches)",
                     CAPTION, legend(len(pred)))  # fmt: skip
        print(f"{path}: context {enc[0].shape[1]} patches, {len(pred)} targets of "
              f"{pred[0].shape[1]} patches, grid {grid}x{grid}")  # fmt: skip
        paths.append(path)
    return paths


def curve(argv: Optional[Sequence[str]] = None) -> Path:
    """``visualize.py curve LOG.jsonl KEY OUT.png``: a metric of a run's log over its rows."""
    from .engine.logger import read_jsonl

    parser = argparse.ArgumentParser(description="plot one metric of a log.jsonl")
    parser.add_argument("log")
    parser.add_argument("key")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    rows = read_jsonl(args.log)
    values = [r[args.key] for r in rows if isinstance(r.get(args.key), (int, float))]
    if not values:
        raise UserError(f"{args.log}: no numeric '{args.key}' values")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    loss_curve(rows, out, args.key, f"{args.key} of {Path(args.log).parent.name}")
    print(f"{out}: {len(values)} values of {args.key}, {values[0]:.4g} -> {values[-1]:.4g}")
    return out


COMMANDS = {"masks": masks, "pca": pca, "losses": losses, "curve": curve}
COMMAND_HELP = {
    "masks": "--fname pretrain/X: PNGs of the masks the config's sampler draws, per step",
    "pca": "<logging.folder>/pca.png: patch features' first 3 principal components as RGB",
    "losses": "<logging.folder>/losses.png: per-patch prediction loss (model.checkpoint)",
    "curve": "LOG.jsonl KEY OUT.png: one metric of a run's log over its rows",
}


def command_parser() -> argparse.ArgumentParser:
    """The parser of the command word alone (each command parses its own options)."""
    listing = "\n".join(f"  {name:8s}{text}" for name, text in COMMAND_HELP.items())
    parser = argparse.ArgumentParser(
        prog="visualize.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pictures for checking the toolkit by eye.",
        epilog=f"commands:\n{listing}\n\n'visualize.py COMMAND --help' lists its options.",
    )  # fmt: skip
    parser.add_argument("command", choices=list(COMMANDS), help="what to draw")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``visualize.py {masks,pca,losses,curve} [--fname cfg.yaml] [key=value ...]``; returns the
    exit status (``runs.run_main``: bad input 2; ``--help``: 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return run_main(lambda: COMMANDS[argv[0]](argv[1:]))
    try:  # no command: --help answers (exit 0), anything else is a usage error (exit 2)
        command_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
