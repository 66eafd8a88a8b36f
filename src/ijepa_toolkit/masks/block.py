"""One rectangular block on a patch grid and the patches outside it (single-block maskings).

Used by packing's context/target split and by ``visualize.py losses`` (``masking=block``); the
official multi-block sampler is ``multiblock.py``.
"""

from __future__ import annotations

import torch


def place_block(
    grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` = (bh, bw) block at a uniform position on the (H, W) ``grid``.

    Draws the top row, then the left column (one ``torch.randint`` each, last row and column
    included). Returns (K_in,) indices inside the block and (K_out,) outside, row-major.
    """
    (h, w), (bh, bw) = grid, size
    top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top : top + bh, left : left + bw] = True
    flat = inside.flatten()
    return flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
