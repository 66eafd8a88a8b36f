"""Fixed 2D sin-cos position embeddings, exactly as the official I-JEPA code computes them."""

from __future__ import annotations

import numpy as np
import torch

SINCOS_ATOL = 1e-4


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


def is_sincos(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> bool:
    """Whether a stored ``(1, N, D)`` table is the fixed sin-cos table of that grid."""
    if pos_embed.ndim != 3 or pos_embed.shape[-1] % 4:
        return False
    ref = sincos_2d(pos_embed.shape[-1], grid_hw)
    if ref.shape[1] != pos_embed.shape[1]:
        return False
    return bool(torch.allclose(pos_embed.detach().float().cpu(), ref, atol=SINCOS_ATOL, rtol=0))
