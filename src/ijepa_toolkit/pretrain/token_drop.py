"""Predictor token dropping with batch repeat, as elucidating-featurenorm-ijepa runs it.

The context encoder runs once per image; the predictor then runs on ``repeats`` copies of the
batch, each copy seeing a random ``capacity`` fraction of the context and of every target mask
(seed: ``get_random_idx_with_replacement`` / ``_without_replacement`` in ``src/model.py``;
docs/token_drop.md):

- units are windows of ``window x window`` patches (the seed's ``mask_window_size: 2``), with the
  default ``window=1`` single tokens; a copy keeps ``round(capacity * windows)`` windows (Python
  rounding, as the seed's ``int(round(...))``, at least one);
- with replacement (the seed's default) every copy draws its windows independently: the top-k of
  fresh uniform scores; without, one permutation of each image's windows is cut into ``repeats``
  disjoint chunks;
- windows marked in ``exclude`` (all padding) score -1, so they are drawn last.

Kept positions are sorted, so ``capacity=1, repeats=1`` is the plain I-JEPA step. Layout: copy
``j`` of image ``b`` is row ``j * B + b`` (repeat-major), for context and targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError


@dataclass
class TokenDrop:
    """The subsets of one step: ``ctx_keep`` indexes the encoder's context tokens."""

    ctx_keep: list  # per context mask: (R*B, kc) positions in [0, Kc) of the encoded tokens
    masks_enc: list  # per context mask: (R*B, kc) patch indices of the kept context tokens
    masks_pred: list  # per target mask: (R*B, kt) patch indices of the kept target tokens
    repeats: int


def kept_count(n: int, capacity: float) -> int:
    """Units a copy keeps of ``n``: ``round(capacity * n)`` (half to even), at least 1."""
    return max(1, int(round(n * capacity)))


def sample_units(
    batch: int, n: int, capacity: float, repeats: int, replacement: bool = True,
    generator: Optional[torch.Generator] = None, exclude: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    """(R*B, k) unit indices in [0, n) for ``repeats`` copies of ``batch`` rows (unsorted).

    ``exclude`` (B, n) bool: units drawn last (score -1). Draws ``torch.rand(R, B, n)`` with
    replacement, ``torch.rand(B, n)`` without, from ``generator``: the seed's random stream.
    """
    k = kept_count(n, capacity)
    if replacement:
        scores = torch.rand(repeats, batch, n, generator=generator)
        if exclude is not None:
            scores = scores.masked_fill(exclude.cpu()[None], -1)
        return scores.topk(k, dim=-1).indices.reshape(repeats * batch, k)
    if k * repeats > n:
        raise ConfigError(
            f"token drop without replacement: {repeats} copies x {k} units > {n} units; lower "
            "model.pred_capacity or model.pred_repeats, or set model.pred_replacement=true"
        )
    scores = torch.rand(batch, n, generator=generator)
    if exclude is not None:
        scores = scores.masked_fill(exclude.cpu(), -1)
    order = scores.argsort(dim=1, descending=True)
    return torch.cat([order[:, j * k : (j + 1) * k] for j in range(repeats)], dim=0)


def unit_positions(units: torch.Tensor, unit: int) -> torch.Tensor:
    """(N, k) unit indices -> (N, k * unit) the positions of their tokens (``unit`` each)."""
    pos = units[..., None] * unit + torch.arange(unit, device=units.device)
    return pos.reshape(len(units), -1)


def window_order(mask: torch.Tensor, grid_w: int, window: int) -> torch.Tensor:
    """(B, K) permutation putting each row of patch indices in window-major order (the ``window
    x window`` windows one after another). Raises ``ConfigError`` unless every window is whole."""
    row, col = mask // grid_w, mask % grid_w
    per_row = -(-grid_w // window)
    wid = (row // window) * per_row + col // window
    perm = (wid * window * window + (row % window) * window + col % window).argsort(dim=1)
    grouped = wid.gather(1, perm).reshape(mask.shape[0], -1, window * window)
    if mask.shape[1] % (window * window) or bool((grouped != grouped[..., :1]).any()):
        raise ConfigError(
            f"model.pred_window={window} needs masks made of whole {window}x{window} windows"
        )
    return perm


def subset_positions(
    mask: torch.Tensor, capacity: float, repeats: int, replacement: bool = True,
    generator: Optional[torch.Generator] = None, window: int = 1, grid_w: int = 0,
) -> torch.Tensor:  # fmt: skip
    """(R*B, k * window**2) sorted positions in [0, K) into the (B, K) ``mask`` per copy."""
    b, n = mask.shape
    unit = window * window
    perm = window_order(mask, grid_w, window) if window > 1 else None
    units = sample_units(b, n // unit, capacity, repeats, replacement, generator)
    pos = unit_positions(units.to(mask.device), unit)
    if perm is not None:
        pos = perm.repeat(repeats, 1).gather(1, pos)
    return pos.sort(dim=1).values


def sample_token_drop(
    masks_enc: list, masks_pred: list, capacity: float, repeats: int, replacement: bool = True,
    generator: Optional[torch.Generator] = None, window: int = 1, grid_w: int = 0,
) -> TokenDrop:  # fmt: skip
    """Draw the context subsets, then the target subsets, for masks of (B, K) patch indices on a
    grid ``grid_w`` patches wide (needed for ``window > 1``)."""
    if not 0 < capacity <= 1 or repeats < 1:
        raise ConfigError(
            f"model.pred_capacity={capacity} must be in (0, 1] and model.pred_repeats={repeats} "
            "at least 1"
        )
    draw = dict(replacement=replacement, generator=generator, window=window, grid_w=grid_w)
    ctx_keep = [subset_positions(m, capacity, repeats, **draw) for m in masks_enc]
    enc = [m.repeat(repeats, 1).gather(1, k) for m, k in zip(masks_enc, ctx_keep)]
    pred = [
        m.repeat(repeats, 1).gather(1, subset_positions(m, capacity, repeats, **draw))
        for m in masks_pred
    ]
    return TokenDrop(ctx_keep, enc, pred, repeats)


def select_context(ctx: torch.Tensor, drop: TokenDrop) -> torch.Tensor:
    """(M*B, Kc, D) encoded context (mask-major) -> (M*R*B, kc, D) the predictor's input."""
    chunks = ctx.chunk(len(drop.ctx_keep), dim=0)
    out = []
    for c, keep in zip(chunks, drop.ctx_keep):
        index = keep.unsqueeze(-1).expand(-1, -1, c.shape[-1])
        out.append(torch.gather(c.repeat(drop.repeats, 1, 1), 1, index))
    return torch.cat(out, dim=0)
