"""Normalisation of the target tokens before the loss (the feature-normalisation study).

``layernorm`` is the official ``F.layer_norm`` over channels (no affine); ``batchnorm`` normalises
each channel with the mean/std of the current global batch (all tokens, all ranks); ``running_
batchnorm`` with an EMA (momentum 0.99) of those statistics; ``none`` leaves the tokens as they
are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import all_reduce_sum

TARGET_NORMS = ("layernorm", "batchnorm", "running_batchnorm", "none")


def global_channel_stats(h: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (D,) of (B, N, D) tokens over every token of every rank."""
    flat = h.reshape(-1, h.shape[-1]).float()
    count = all_reduce_sum(torch.tensor([float(flat.shape[0])], device=h.device))
    mean = all_reduce_sum(flat.sum(dim=0)) / count
    var = all_reduce_sum(((flat - mean) ** 2).sum(dim=0)) / count
    return mean, (var + eps).sqrt()


class TargetNorm(nn.Module):
    """(B, N, D) target tokens -> normalised (B, N, D); call under ``torch.no_grad()``.

    ``running_batchnorm`` keeps ``running_mean``/``running_std`` buffers (saved with the training
    state), initialised from the first batch, then ``r = momentum * r + (1 - momentum) * batch``.
    """

    def __init__(self, kind: str, dim: int, momentum: float = 0.99, eps: float = 1e-5):
        super().__init__()
        if kind not in TARGET_NORMS:
            raise ValueError(f"target norm must be one of {TARGET_NORMS}, got {kind!r}")
        self.kind, self.momentum, self.eps = kind, momentum, eps
        if kind == "running_batchnorm":
            self.register_buffer("running_mean", torch.zeros(dim))
            self.register_buffer("running_std", torch.ones(dim))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(h, (h.shape[-1],))
        if self.kind == "none":
            return h
        mean, std = global_channel_stats(h, self.eps)
        if self.kind == "running_batchnorm":
            if not bool(self.initialized):
                self.running_mean.copy_(mean)
                self.running_std.copy_(std)
                self.initialized.fill_(True)
            else:
                self.running_mean.lerp_(mean, 1.0 - self.momentum)
                self.running_std.lerp_(std, 1.0 - self.momentum)
            mean, std = self.running_mean, self.running_std
        return ((h.float() - mean) / std).to(h.dtype)
