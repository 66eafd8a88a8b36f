"""Pictures for checking the toolkit by eye.

``python visualize.py masks --fname configs/pretrain/X.yaml [--steps 4] [--images 8] [--out DIR]
[key=value ...]`` writes ``masks_step<S>.png``: images of the config's data with the context
(blue) and target blocks (one colour each) that the config's mask sampler draws at step S.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ijepa_toolkit.config import config_parser, parse_config
from ijepa_toolkit.data.folder import SafeImageFolder
from ijepa_toolkit.data.transforms import eval_transform
from ijepa_toolkit.masks.multiblock import MultiBlockMaskSampler
from ijepa_toolkit.masks.render import render_masks
from ijepa_toolkit.pretrain.data import resolve_folders
from ijepa_toolkit.pretrain.model import encoder_arch
from ijepa_toolkit.pretrain.train import PretrainConfig

COMMANDS = ("masks",)


def masks(argv: list[str]) -> list[Path]:
    """Write one PNG per step; returns their paths."""
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
        render_masks(images, enc, pred, arch.patch_size, scale).save(path)
        print(f"{path}: context {enc[0].shape[1]} patches, {len(pred)} targets of "
              f"{pred[0].shape[1]} patches, grid {grid}x{grid}")  # fmt: skip
        paths.append(path)
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: visualize.py {{{','.join(COMMANDS)}}} ...\n{__doc__}", file=sys.stderr)
        return 2
    masks(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
