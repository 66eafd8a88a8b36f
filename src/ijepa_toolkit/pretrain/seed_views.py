"""The featurenorm seed's random views: a random resize, then a random context subset of 2x2
windows, drawn call for call as its ``get_repeated_data`` (LiDAR, per-sample losses) draws them.

theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3,
``src/dataset.py``: ``ImageSizeFilter``, ``RandomImageResizer`` (a side length drawn with
``random.Random.randint``, sizes rounded to ``patch * window`` pixels, PIL bilinear),
``ContextTargetSplitter`` (a window count drawn with ``randint``, windows shuffled by
``torch.randperm`` on a generator seeded once from the splitter's ``random.Random``) and
``ContextTargetDatasetConfig`` (the derived lengths). Given the same two seeds, ``SeedViews``
returns the seed's sizes and context positions exactly (tests/test_pretrain_seed_modes.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import PIL.Image
import torch
from torchvision.transforms import functional as TF

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .packing import PackedBatch, _pack_part, patchify
from .packing_split import context_window_bounds, window_split


@dataclass(frozen=True)
class ViewOptions:
    """``ContextTargetDatasetConfig`` fields; sides in pixels, capacities as window fractions."""

    patch: int = 16
    window: int = 2
    min_side: int = 64
    max_side: int = 256
    min_context: float = 0.25
    max_context: float = 0.5
    absolute_max_context: float = 0.5

    @property
    def unit(self) -> int:
        return self.patch * self.window

    @property
    def max_patches(self) -> int:
        return (self.max_side // self.patch) ** 2

    @property
    def context_length(self) -> int:
        """Most context tokens of one view (``packer_context_sequence_length``, no registers)."""
        return int(round(self.max_patches * self.absolute_max_context))

    @property
    def target_length(self) -> int:
        """Most target tokens of one view (``max_num_target_patches``)."""
        per = self.window**2
        return self.max_patches - int((self.max_patches // per) * self.min_context) * per


def keeps(size: tuple[int, int], options: ViewOptions) -> bool:
    """``ImageSizeFilter``: the mean side of a (W, H) image is at least ``min_side``."""
    return int((size[0] + size[1]) / 2) >= options.min_side


def resized_size(size: tuple[int, int], side: int, options: ViewOptions) -> tuple[int, int]:
    """``RandomImageResizer``'s (W, H) for a (W, H) image and a drawn mean side ``side``."""
    w, h = size
    scale = side / ((w + h) / 2)
    new = (w * scale, h * scale)
    max_pixels = options.max_patches * options.patch**2
    if math.prod(new) > max_pixels:
        shrink = (max_pixels / math.prod(new)) ** 0.5
        new = tuple(int(s * shrink) for s in new)
    unit = options.unit
    new = tuple(min(max(int(round(s / unit)) * unit, unit), options.max_side) for s in new)
    while min(s // unit for s in new) < 2:  # at least two units per side
        new = tuple(s + unit for s in new)
    return new


def context_windows(total: int, options: ViewOptions, rng: random.Random) -> int:
    """``ContextTargetSplitter``'s number of context windows out of ``total``."""
    lo, hi = context_window_bounds(total, options.window,
                                   (options.min_context, options.max_context),
                                   options.context_length)  # fmt: skip
    if total == 2:
        return 1
    return hi if lo >= hi else rng.randint(lo, hi)


@dataclass
class View:
    """One view: (3, H, W) normalised pixels, its patch grid and row-major patch indices of
    the context and target tokens (context in the seed's token order)."""

    pixels: torch.Tensor
    grid: tuple[int, int]
    ctx: torch.Tensor
    tgt: torch.Tensor


class SeedViews:
    """Draws views as the seed's resizer and splitter seeded with ``random.Random(resize_seed)``
    and ``random.Random(split_seed)``: ``views(image)`` is the next view of a PIL image."""

    def __init__(self, options: ViewOptions, resize_seed: int = 0, split_seed: int = 1):
        self.options = options
        self.resize_rng = random.Random(resize_seed)
        self.split_rng = random.Random(split_seed)
        self.gen = torch.Generator().manual_seed(self.split_rng.randint(0, 2**30))

    def resize(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The randomly resized RGB image (PIL bilinear)."""
        o = self.options
        w, h = image.size
        if (w + h) / 2 < o.min_side:
            raise ValueError(f"a {w}x{h} image is below the mean side {o.min_side}: filter it")
        top = min(int(round((w + h) / 2)), o.max_side)
        side = o.min_side if o.min_side == top else self.resize_rng.randint(o.min_side, top)
        size = resized_size((w, h), side, o)
        return image.convert("RGB").resize(size, resample=PIL.Image.Resampling.BILINEAR)

    def split(self, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-major patch indices of the (context, target) tokens of a (gh, gw) grid."""
        ws = self.options.window
        total = (gh // ws) * (gw // ws)
        k = context_windows(total, self.options, self.split_rng)
        return window_split(gh, gw, ws, k, torch.randperm(total, generator=self.gen))

    def __call__(self, image: PIL.Image.Image) -> View:
        resized = self.resize(image)
        pixels = TF.normalize(TF.to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD)
        p = self.options.patch
        gh, gw = pixels.shape[1] // p, pixels.shape[2] // p
        ctx, tgt = self.split(gh, gw)
        return View(pixels, (gh, gw), ctx, tgt)


def views_batch(views: list[View], patch: int) -> PackedBatch:
    """One packed row per view: (R, Lc) context and (R, Lt) target tokens, padded to the
    longest view; ``grids[r]`` is view ``r``'s grid and ``gsample`` its index."""
    items = [(patchify(v.pixels, patch), v.ctx, v.tgt, v.grid[1], None) for v in views]
    rows = [[r] for r in range(len(views))]
    parts = [_pack_part(items, rows, max(len(item[which]) for item in items), which)
             for which in (1, 2)]  # fmt: skip
    return PackedBatch(*parts[0], *parts[1], grids=[v.grid for v in views], rows=rows)
