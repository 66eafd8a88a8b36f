"""Normalisation layers for the encoder: LayerNorm (official) or DynTanh.

DynTanh (Zhu et al., 2025, "Transformers without normalization"): ``gamma * tanh(alpha * x) +
beta`` with a learned per-channel ``alpha`` (initialised at 0.5); ``gamma``/``beta`` are stored as
``weight``/``bias`` like LayerNorm's, so an encoder built with it is still a timm
``VisionTransformer`` whose state dict differs only by the ``alpha`` tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

NORM_KINDS = ("layernorm", "dyntanh")


class DynTanh(nn.Module):
    """``weight * tanh(alpha * x) + bias`` over the last dimension; (..., D) -> (..., D).

    ``alpha`` is per channel (D,), initialised at ``alpha_init``. ``affine=False`` drops
    ``weight``/``bias`` (the output is ``tanh(alpha * x)``).
    """

    def __init__(self, dim: int, alpha_init: float = 0.5, affine: bool = True, device=None,
                 dtype=None):  # fmt: skip
        super().__init__()
        self.dim = dim
        self.alpha_init = alpha_init
        dd = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.full((dim,), float(alpha_init), **dd))
        if affine:
            self.weight = nn.Parameter(torch.ones(dim, **dd))
            self.bias = nn.Parameter(torch.zeros(dim, **dd))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.alpha * x)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}, affine={self.weight is not None}"


def norm_layer(kind: str, eps: float = 1e-6, affine: bool = True) -> Callable[[int], nn.Module]:
    """A ``norm_layer(dim)`` factory for timm: ``layernorm`` (always affine) or ``dyntanh``."""
    if kind == "layernorm":
        return partial(nn.LayerNorm, eps=eps)
    if kind == "dyntanh":
        return partial(DynTanh, affine=affine)
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")
