"""Fixed 2D sin-cos position embeddings, exactly as the official I-JEPA code computes them.

Released *target* encoders do not hold the exact table: the official EMA
(facebookresearch/ijepa ``src/train.py`` @ 52c1ae95, ``param_k.data.mul_(m).add_((1.-m) *
param_q.detach().data)``) runs over every parameter, the frozen ``pos_embed`` included, and its
float32 rounding moves the table a little at every step (``replay_official_ema``). The context
encoder's table is never updated and stays exact. ``EXACT_ATOL`` tells the exact table (float32
rounding of the float64 formula); ``DRIFT_ATOL`` a target table that only the EMA rounding moved:
the replayed drift is 1.44e-4 after IN1K ViT-H/14's 187,500 steps (``bench/pos_drift.py``,
``docs/loading.md``) and grows with the steps; 1e-3 leaves room for runs several times longer and
is still far below what training moves a learned table (its entries move by 1e-2 and more).
"""

from __future__ import annotations

import numpy as np
import torch

EXACT_ATOL = 1e-6
DRIFT_ATOL = 1e-3


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) table: sin of all frequencies, then cos (float64)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(1, H*W, dim) float32 table for a row-major grid of H rows and W columns.

    The first half of the channels encodes the column index and the second half the row index,
    which is what the official ``get_2d_sincos_pos_embed`` computes on square grids.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be a multiple of 4, got {dim}")
    h, w = grid_hw
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def sincos_distance(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> float:
    """max |table - sin-cos formula| of a stored ``(1, N, D)`` table; inf if the shapes differ."""
    if pos_embed.ndim != 3 or pos_embed.shape[-1] % 4:
        return float("inf")
    ref = sincos_2d(pos_embed.shape[-1], grid_hw)
    if ref.shape[1] != pos_embed.shape[1]:
        return float("inf")
    return float((pos_embed.detach().float().cpu() - ref).abs().max())


def is_sincos(pos_embed: torch.Tensor, grid_hw: tuple[int, int], atol: float = DRIFT_ATOL) -> bool:
    """Whether a stored ``(1, N, D)`` table is the grid's sin-cos table (to ``atol``)."""
    return sincos_distance(pos_embed, grid_hw) <= atol


def replay_official_ema(
    table: torch.Tensor, steps: int, total_steps: int, ema: tuple[float, float] = (0.996, 1.0)
) -> torch.Tensor:
    """The target copy of a frozen ``table`` after ``steps`` official EMA updates, in float32.

    Momentum ``m_i = ema[0] + i * (ema[1] - ema[0]) / total_steps`` for ``i = 0, 1, ...`` (the
    official generator, ``total_steps = ipe * epochs * ipe_scale``); each step is
    ``k.mul_(m).add_((1 - m) * q)`` with ``q = table`` (never updated: no gradient). Returns ``k``.
    """
    q = table.detach().float()
    k = q.clone()
    for i in range(steps):
        m = ema[0] + i * (ema[1] - ema[0]) / total_steps
        k.mul_(m).add_((1.0 - m) * q)
    return k
