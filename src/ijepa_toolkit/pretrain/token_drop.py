"""Predictor token dropping with batch repeat (feature-normalisation I-JEPA codebase).

The context encoder runs once per image; the predictor then runs on ``repeats`` copies of the
batch, each copy seeing a random ``capacity`` fraction of the context tokens and of every target
block. Without replacement the copies of one image see disjoint subsets (a random permutation cut
into ``repeats`` chunks; with ``capacity * repeats == 1`` every token is used exactly once); with
replacement each copy draws its subset independently. Kept indices are sorted, so
``capacity=1, repeats=1`` is the plain I-JEPA step.

Layout: copy ``j`` of image ``b`` is row ``j * B + b`` (repeat-major), for context and targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TokenDrop:
    """The subsets of one step: ``ctx_keep`` indexes the encoder's context tokens."""

    ctx_keep: list  # per context mask: (R*B, kc) positions in [0, Kc) of the encoded tokens
    masks_enc: list  # per context mask: (R*B, kc) patch indices of the kept context tokens
    masks_pred: list  # per target mask: (R*B, kt) patch indices of the kept target tokens
    repeats: int


def kept_count(n: int, capacity: float) -> int:
    """Tokens a copy keeps of ``n``: ``floor(capacity * n)``, at least 1."""
    return max(1, int(capacity * n))


def subset_positions(
    batch: int, n: int, capacity: float, repeats: int, replacement: bool,
    generator: Optional[torch.Generator] = None, device=None,
) -> torch.Tensor:  # fmt: skip
    """(R*B, k) sorted positions in [0, n) for ``repeats`` copies of ``batch`` rows."""
    k = kept_count(n, capacity)
    if replacement:
        order = torch.rand(repeats * batch, n, generator=generator).argsort(dim=1)[:, :k]
    else:
        if k * repeats > n:
            raise ValueError(
                f"token drop without replacement: {repeats} copies x {k} tokens > {n} tokens; "
                "lower model.pred_capacity or model.pred_repeats, or set model.pred_replacement"
            )
        perm = torch.rand(batch, n, generator=generator).argsort(dim=1)
        order = torch.cat([perm[:, j * k : (j + 1) * k] for j in range(repeats)], dim=0)
    return order.sort(dim=1).values.to(device)


def sample_token_drop(
    masks_enc: list, masks_pred: list, capacity: float, repeats: int, replacement: bool,
    generator: Optional[torch.Generator] = None,
) -> TokenDrop:  # fmt: skip
    """Draw the context and target subsets for masks of (B, K) patch indices."""
    if not 0 < capacity <= 1 or repeats < 1:
        raise ValueError(f"capacity must be in (0, 1] and repeats >= 1; got {capacity}, {repeats}")
    ctx_keep, enc, pred = [], [], []
    for m in masks_enc:
        keep = subset_positions(len(m), m.shape[1], capacity, repeats, replacement, generator,
                                m.device)  # fmt: skip
        ctx_keep.append(keep)
        enc.append(torch.gather(m.repeat(repeats, 1), 1, keep))
    for m in masks_pred:
        keep = subset_positions(len(m), m.shape[1], capacity, repeats, replacement, generator,
                                m.device)  # fmt: skip
        pred.append(torch.gather(m.repeat(repeats, 1), 1, keep))
    return TokenDrop(ctx_keep, enc, pred, repeats)


def select_context(ctx: torch.Tensor, drop: TokenDrop) -> torch.Tensor:
    """(M*B, Kc, D) encoded context (mask-major) -> (M*R*B, kc, D) the predictor's input."""
    chunks = ctx.chunk(len(drop.ctx_keep), dim=0)
    out = []
    for c, keep in zip(chunks, drop.ctx_keep):
        index = keep.unsqueeze(-1).expand(-1, -1, c.shape[-1])
        out.append(torch.gather(c.repeat(drop.repeats, 1, 1), 1, index))
    return torch.cat(out, dim=0)
