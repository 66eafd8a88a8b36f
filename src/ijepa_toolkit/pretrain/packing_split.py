"""Context / target splits of one packed image (``packing.split``; docs/packing.md).

- ``block``: one random rectangle of patches is the target, the rest the context (the
  toolkit's own split, ``masks/block.py``);
- ``featurenorm_windows``: as elucidating-featurenorm-ijepa's ``ContextTargetSplitter``
  (``src/dataset.py``): the image's ``window x window`` windows are shuffled, the first
  ``n`` windows are the context, the rest the target, ``n`` uniform in a range set by
  ``packing.context_fraction`` and the row's context budget;
- ``enhanced_blocks``: as ijepa-enhanced's ``make_context_prediction_masks``
  (``ijepa_enhanced/mask.py``): ``num_targets`` rectangles of one drawn size at independent
  positions; their union is the target, the rest the context, and the predictor predicts each
  rectangle in its own copy of the row.

``enhanced_crop`` is ijepa-enhanced's way to size an image (``packing.resize: enhanced_crop``).

Every split returns ``(ctx, tgt, blocks)``: (Kc,) and (Kt,) patch indices (row-major on the
image's grid) in the order they are packed, and ``blocks`` (Kt, M) bool (which target
rectangle each target patch lies in; None for the one-target splits).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..masks.block import place_block

ENHANCED_TRIALS = 5  # ijepa-enhanced mask.py: num_trials


def context_window_bounds(
    total: int, window: int, fraction: tuple, max_tokens: int
) -> tuple[int, int]:
    """(lo, hi) context windows for an image of ``total`` windows (featurenorm's rule).

    ``lo = max(round(total * fraction[0]), 1)``, ``hi = min(round(total * fraction[1]),
    total - 1, max_tokens // window**2)`` (Python rounding, as the seed's ``int(round(...))``).
    """
    lo = max(int(round(total * fraction[0])), 1)
    hi = min(int(round(total * fraction[1])), total - 1, max_tokens // (window * window))
    return lo, hi


def window_split(gh: int, gw: int, window: int, n_ctx: int, perm: torch.Tensor):
    """Patch indices of the first ``n_ctx`` windows of ``perm`` (context) and of the others
    (target), each window's patches row-major inside it, windows in ``perm`` order."""
    wh, ww = gh // window, gw // window
    rows = torch.arange(gh * gw).reshape(wh, window, ww, window).permute(0, 2, 1, 3)
    windows = rows.reshape(wh * ww, window * window)[perm]
    return windows[:n_ctx].reshape(-1), windows[n_ctx:].reshape(-1)


def featurenorm_split(gh: int, gw: int, window: int, fraction, max_tokens: int, gen):
    """featurenorm's split: draw the context window count (``torch.randint``, inclusive
    bounds of ``context_window_bounds``; 1 of 2 windows; ``hi`` when ``lo >= hi``), then the
    window order (``torch.randperm``)."""
    total = (gh // window) * (gw // window)
    if total < 2:
        raise UserError(f"a {gh}x{gw}-patch image has fewer than 2 {window}x{window} windows; "
                        "raise packing.min_side")  # fmt: skip
    lo, hi = context_window_bounds(total, window, fraction, max_tokens)
    if total == 2:
        n = 1
    elif lo >= hi:
        n = hi
    else:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    ctx, tgt = window_split(gh, gw, window, n, torch.randperm(total, generator=gen))
    return ctx, tgt, None


def _uniform(a: float, b: float, gen) -> float:
    """``(b - a) * u + a`` with ``u = torch.rand(1)`` (ijepa-enhanced ``random_uniform``)."""
    return (b - a) * torch.rand((1,), generator=gen).item() + a


def enhanced_masks(rows, cols, num: int, scale, aspect, gen) -> torch.Tensor:
    """(K, num) bool: ijepa-enhanced's target rectangles over patches at (``rows``, ``cols``).

    One size for all rectangles: area ``U(scale) * H * W`` (H, W = 1 + the largest row / col),
    aspect ``U(aspect)`` drawn linearly (``aspect[0] + (aspect[1] - aspect[0]) * u``), sides
    rounded (at least 1, at most the grid); each rectangle at a uniform top, then left. Up to 5
    tries until the union covers 1 .. max(K_grid - 4, 1) patches, the last try kept.
    """
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    area = _uniform(scale[0], scale[1], gen) * h * w
    ar = _uniform(aspect[0], aspect[1], gen)
    bh = max(1, min(h, round((area * ar) ** 0.5)))
    bw = max(1, min(w, round((area / ar) ** 0.5)))
    for _ in range(ENHANCED_TRIALS):
        masks = []
        for _ in range(num):
            top = torch.randint(0, h - bh + 1, (1,), generator=gen)
            left = torch.randint(0, w - bw + 1, (1,), generator=gen)
            inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
            masks.append(inside)
        masks = torch.stack(masks, -1)
        if 1 <= int(masks.any(-1).sum()) <= max(h * w - 4, 1):
            break
    return masks


def enhanced_split(gh: int, gw: int, section, gen):
    """ijepa-enhanced's split: patches dropped with ``drop_chance`` (``torch.rand > p`` keeps),
    then ``enhanced_masks`` over the kept ones; context = kept patches in no rectangle.
    Each part above its row budget keeps a random subset of that size (order kept)."""
    index = torch.arange(gh * gw)
    if section.drop_chance > 0:
        index = index[torch.rand(gh * gw, generator=gen) > section.drop_chance]
        if len(index) == 0:
            index = torch.arange(1)
    masks = enhanced_masks(index // gw, index % gw, section.num_targets, section.target_scale,
                           section.target_aspect, gen)  # fmt: skip
    hit = masks.any(-1)
    if bool(hit.all()):  # (only on tiny grids) keep one context patch
        hit[0], masks[0] = False, False
    ctx, tgt, blocks = index[~hit], index[hit], masks[hit]
    ctx = _cap(ctx, section.ctx_budget, gen)[0]
    tgt, keep = _cap(tgt, section.tgt_budget, gen)
    return ctx, tgt, blocks[keep]


def _cap(index: torch.Tensor, budget: int, gen):
    """A random ``budget``-subset of ``index`` (order kept) when longer, and its positions."""
    keep = torch.arange(len(index))
    if len(index) > budget:
        keep = torch.randperm(len(index), generator=gen)[:budget].sort().values
    return index[keep], keep


def block_split(gh: int, gw: int, section, gen):
    """The toolkit's one-block split: area fraction ``U(target_scale)``, log-uniform aspect in
    ``target_aspect``, at least one context patch."""
    if gh * gw < 2:
        raise UserError(f"a {gh}x{gw}-patch image has no room for both context and target")
    lo, hi = section.target_scale
    scale = lo + (hi - lo) * float(torch.rand(1, generator=gen))
    log_a = [math.log(a) for a in section.target_aspect]
    aspect = math.exp(log_a[0] + (log_a[1] - log_a[0]) * float(torch.rand(1, generator=gen)))
    area = max(1.0, scale * gh * gw)
    bh = min(gh, max(1, round(math.sqrt(area * aspect))))
    bw = min(gw, max(1, round(math.sqrt(area / aspect))))
    if bh * bw == gh * gw:  # keep at least one context patch
        bh, bw = (bh - 1, bw) if bh > 1 else (bh, bw - 1)
    tgt, ctx = place_block((gh, gw), (bh, bw), gen)
    return ctx, tgt, None


def enhanced_crop(image: torch.Tensor, min_side: int, max_side: int, unit: int, gen):
    """ijepa-enhanced's ``RandomCrop`` (``resize_mode: crop``, ``ijepa_enhanced/data.py``): a
    (C, H, W) crop of ``image``, not resized. ``get_resized_h_w``: ``side = int((max - min) * u +
    min)``, the area ``side**2`` at the image's aspect, capped at the image, each side floored
    to whole ``unit`` pixels (at least one); then torchvision's ``RandomCrop.get_params``: top,
    then left (``torch.randint``), no draw when the crop is the whole image."""
    h, w = image.shape[-2:]
    side = int((max_side - min_side) * torch.rand((1,), generator=gen) + min_side)
    nw = ((side**2) / (h / w)) ** 0.5
    nh, nw = min((h / w) * nw, h), min(nw, w)
    th, tw = int(max(nh // unit, 1)) * unit, int(max(nw // unit, 1)) * unit
    if (th, tw) == (h, w):
        return image
    top = torch.randint(0, h - th + 1, size=(1,), generator=gen).item()
    left = torch.randint(0, w - tw + 1, size=(1,), generator=gen).item()
    return image[..., top : top + th, left : left + tw]


def split_image(gh: int, gw: int, section, gen: torch.Generator):
    """``(ctx, tgt, blocks)`` of one (gh, gw)-patch image under ``section.split``."""
    if section.split == "featurenorm_windows":
        return featurenorm_split(gh, gw, section.window, section.context_fraction,
                                 section.ctx_budget, gen)  # fmt: skip
    if section.split == "enhanced_blocks":
        return enhanced_split(gh, gw, section, gen)
    return block_split(gh, gw, section, gen)
