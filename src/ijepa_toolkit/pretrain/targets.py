"""Normalisation of the target tokens before the loss (the feature-normalisation study).

As elucidating-featurenorm-ijepa ``src/model.py`` (``IJEPAModel.forward``, ``RunningBatchNorm``;
docs/pretrain.md, "Target normalisation"):

- ``layernorm``: the official ``F.layer_norm`` over channels (no affine);
- ``batchnorm``: each channel minus its mean, divided by its unbiased std clamped at 1e-7, the
  statistics taken over the **target tokens only** (``valid``; padding and context excluded) of
  the current global batch (all ranks);
- ``running_batchnorm``: the same statistics, but an EMA of them (momentum 0.99, initialised from
  the first batch, updated in training mode only); the std is clamped at 1e-5 when used;
- ``running_batchnorm_singleton``: as ``running_batchnorm`` with one mean and one std over all
  tokens and channels;
- ``none``: the tokens as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import all_reduce_sum
from ..errors import ConfigError

TARGET_NORMS = (
    "layernorm", "batchnorm", "running_batchnorm", "running_batchnorm_singleton", "none"
)  # fmt: skip
BATCHNORM_EPS = 1e-7  # seed: std.clamp(1e-7) for batchnorm
RUNNING_EPS = 1e-5  # seed: RunningBatchNorm(eps=1e-5)


def global_stats(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std (D,) of (T, D) tokens pooled over every rank (std unclamped)."""
    flat = tokens.float()
    count = all_reduce_sum(torch.tensor([float(flat.shape[0])], device=flat.device))
    mean = all_reduce_sum(flat.sum(dim=0)) / count
    var = all_reduce_sum(((flat - mean) ** 2).sum(dim=0)) / (count - 1).clamp(min=1)
    return mean, var.sqrt()


def target_token_mask(groups: list, shape: tuple) -> torch.Tensor:
    """(B, N) bool: True at every patch some target mask of ``groups`` selects.

    ``groups``: ``(rows, masks_enc, masks_pred)`` per mask group, ``masks_pred`` a list of
    (len(rows), K) patch indices; ``shape``: (B, N)."""
    device = groups[0][2][0].device
    valid = torch.zeros(shape, dtype=torch.bool, device=device)
    for rows, _, masks_pred in groups:
        part = valid[rows]
        for m in masks_pred:
            part.scatter_(1, m, True)
        valid[rows] = part
    return valid


class TargetNorm(nn.Module):
    """(B, N, D) target tokens -> normalised (B, N, D); call under ``torch.no_grad()``.

    ``forward(h, valid)``: ``valid`` (B, N) bool marks the target tokens the statistics are taken
    over (None: all). The running kinds keep ``running_mean`` / ``running_std`` buffers (saved
    with the training state): ``r = momentum * r + (1 - momentum) * batch``.
    """

    def __init__(self, kind: str, dim: int, momentum: float = 0.99):
        super().__init__()
        if kind not in TARGET_NORMS:
            raise ConfigError(f"model.target_norm must be one of {TARGET_NORMS}, got {kind!r}")
        self.kind, self.momentum = kind, momentum
        if kind.startswith("running"):
            size = 1 if kind.endswith("singleton") else dim
            self.register_buffer("running_mean", torch.zeros(size))
            self.register_buffer("running_std", torch.ones(size))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, h: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(h, (h.shape[-1],))
        if self.kind == "none":
            return h
        tokens = h[valid] if valid is not None else h.reshape(-1, h.shape[-1])
        if self.kind == "running_batchnorm_singleton":
            tokens = tokens.reshape(-1, 1)
        mean, std = global_stats(tokens)
        if self.kind == "batchnorm":
            std = std.clamp(min=BATCHNORM_EPS)
        else:
            mean, std = self._running(mean, std)
        return ((h.float() - mean) / std).to(h.dtype)

    def _running(self, mean: torch.Tensor, std: torch.Tensor):
        """Update the EMA (training mode, or the first call) and return it, std clamped."""
        if not bool(self.initialized):
            self.running_mean.copy_(mean)
            self.running_std.copy_(std)
            self.initialized.fill_(True)
        elif self.training:
            self.running_mean.lerp_(mean, 1.0 - self.momentum)
            self.running_std.lerp_(std, 1.0 - self.momentum)
        return self.running_mean, self.running_std.clamp(min=RUNNING_EPS)
