"""Direct, loop-by-loop computations that the library's fast paths are tested against."""

from __future__ import annotations

import torch


@torch.no_grad()
def concat4_by_hand(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 4*D): each of the last 4 blocks' tokens through the final norm, mean over tokens."""
    tokens = encoder._pos_embed(encoder.patch_embed(x))
    pooled = []
    for blk in encoder.blocks:
        tokens = blk(tokens)
        pooled.append(encoder.norm(tokens).mean(dim=1))
    return torch.cat(pooled[-4:], dim=-1)
