"""The depth probe's module (``depth.py`` imports it when work starts): a frozen encoder and a
trainable depth head (``models/depth_head.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..engine.utils import autocast
from ..models.depth_head import DepthHead, dense_features, resolve_blocks

if TYPE_CHECKING:
    from .depth import DepthConfig


class DepthProbe(nn.Module):
    """Frozen encoder + depth head; only ``head`` has trainable parameters and is checkpointed."""

    def __init__(self, encoder: nn.Module, cfg: DepthConfig):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        p = cfg.probe
        self.blocks = resolve_blocks(p.features, p.blocks, len(encoder.blocks))
        self.pooled_token, self.final_norm = p.pooled_token, p.final_norm
        self.use_bf16 = cfg.meta.use_bfloat16
        width = len(self.blocks) * encoder.embed_dim * (2 if p.pooled_token else 1)
        self.head = DepthHead(width, p.head, cfg.data.min_depth, cfg.data.max_depth, p.n_bins,
                              p.batchnorm, p.upsample)  # fmt: skip

    def train(self, mode: bool = True) -> DepthProbe:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, ever
        return self

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """(B, 3, h, w) normalised images -> (B, 1, *out_size) depth in metres."""
        with torch.no_grad(), autocast(x.device, self.use_bf16):
            feats = dense_features(self.encoder, x, self.blocks, self.pooled_token, self.final_norm)
        return self.head(feats.float(), out_size)
