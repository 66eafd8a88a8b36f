"""Dense features of a frozen encoder and the linear / bins depth heads (DINOv2-style probes).

Features: the patch tokens of chosen blocks as (B, D, h, w) maps (timm's
``forward_intermediates``), each optionally with its pooled token (the mean of that block's
tokens, I-JEPA having no class token) broadcast and concatenated, then all blocks concatenated:
(B, L*D) or (B, 2*L*D) channels. Heads: a 1x1 convolution on that map, bilinear upsampling, then
``linear``: depth = exp(output) (log-depth regression), or ``bins``: DINOv2's linear depth head,
256 bins uniform over [min_depth, max_depth], weights relu(logits) + 0.1 normalised to sum to 1,
depth = expectation over the bin centres.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "bins")
FEATURES = ("last", "four")
# DINOv2's depth probes (dinov2/eval/depth configs): ViT-S/B, ViT-L, ViT-g.
DINOV2_BLOCKS = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}


def default_blocks(depth: int) -> list[int]:
    """4 block indices (0-based): DINOv2's for depths 12/24/40, else evenly spaced to the last."""
    if depth in DINOV2_BLOCKS:
        return list(DINOV2_BLOCKS[depth])
    if depth < 4:
        raise ValueError(f"features 'four' needs at least 4 blocks; the encoder has {depth}")
    return [math.floor((i + 1) * depth / 4 + 0.5) - 1 for i in range(4)]


def resolve_blocks(features: str, blocks: Optional[Sequence[int]], depth: int) -> list[int]:
    """Block indices for ``features`` (``last`` / ``four``); explicit ``blocks`` win for four."""
    if features == "last":
        if blocks:
            raise ValueError("probe.blocks is only used with probe.features=four")
        return [depth - 1]
    if features != "four":
        raise ValueError(f"probe.features={features!r}: expected one of {FEATURES}")
    chosen = list(blocks) if blocks else default_blocks(depth)
    if len(chosen) != 4 or len(set(chosen)) != 4 or not all(0 <= b < depth for b in chosen):
        raise ValueError(
            f"probe.blocks={chosen}: expected 4 distinct block indices in [0, {depth - 1}]"
        )
    return sorted(chosen)


def dense_features(
    encoder: nn.Module,
    x: torch.Tensor,
    blocks: Sequence[int],
    pooled_token: bool = False,
    final_norm: bool = True,
) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, C, H/p, W/p) maps, C = len(blocks) * D * (2 if pooled_token).

    ``final_norm`` passes each block's tokens through the encoder's final norm first.
    """
    maps = encoder.forward_intermediates(
        x, indices=list(blocks), norm=final_norm, output_fmt="NCHW", intermediates_only=True
    )
    if pooled_token:
        maps = [torch.cat([m, m.mean(dim=(2, 3), keepdim=True).expand_as(m)], dim=1) for m in maps]
    return torch.cat(maps, dim=1)


class DepthHead(nn.Module):
    """Optional BatchNorm, 1x1 conv, bilinear upsampling, then depth in metres.

    The conv runs at the patch grid and its outputs are upsampled by ``upsample`` before the
    nonlinearity; at inference that equals DINOv2's order (features upsampled, then BN and conv,
    all linear) at a fraction of the memory.
    """

    def __init__(self, in_channels: int, kind: str = "linear", min_depth: float = 1e-3,
                 max_depth: float = 10.0, n_bins: int = 256, batchnorm: bool = True,
                 upsample: int = 4):  # fmt: skip
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"probe.head={kind!r}: expected one of {HEADS}")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.kind = kind
        self.upsample = upsample
        self.norm = nn.BatchNorm2d(in_channels) if batchnorm else nn.Identity()
        self.conv = nn.Conv2d(in_channels, 1 if kind == "linear" else n_bins, kernel_size=1)
        nn.init.trunc_normal_(self.conv.weight, std=0.01)
        if kind == "linear":  # start at the middle of the depth range
            nn.init.constant_(self.conv.bias, math.log((min_depth + max_depth) / 2))
        else:
            nn.init.zeros_(self.conv.bias)
            self.register_buffer("centres", torch.linspace(min_depth, max_depth, n_bins))

    def forward(self, feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """(B, C, h, w) features -> (B, 1, *out_size) depth in metres (bilinear to ``out_size``)."""
        x = self.conv(self.norm(feats))
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        if self.kind == "linear":
            depth = torch.exp(x)
        else:
            weights = torch.relu(x) + 0.1
            weights = weights / weights.sum(dim=1, keepdim=True)
            depth = torch.einsum("bkhw,k->bhw", weights, self.centres).unsqueeze(1)
        return F.interpolate(depth, size=tuple(out_size), mode="bilinear", align_corners=False)
