"""Feature pooling and classification heads on top of an I-JEPA encoder.

``pool="avg"``: mean of the final-norm tokens, the official evaluation pooling, (B, D).
``pool="concat4"``: each of the last 4 blocks' tokens through the final norm, averaged over
tokens, concatenated (the VISSL protocol the I-JEPA paper used for linear probes), (B, 4*D).
"""

from __future__ import annotations

import torch
from torch import nn

POOLS = ("avg", "concat4")
HEAD_BN_EPS = 1e-6  # LinearHead's BatchNorm1d


def pooled_features(encoder: nn.Module, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """(B, C, H, W) images -> (B, D) for ``avg`` or (B, 4*D) for ``concat4``."""
    if pool == "avg":
        return encoder.forward_features(x).mean(dim=1)
    if pool == "concat4":
        layers = encoder.forward_intermediates(
            x, indices=4, norm=True, output_fmt="NLC", intermediates_only=True
        )
        return torch.cat([t.mean(dim=1) for t in layers], dim=-1)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def feature_dim(encoder: nn.Module, pool: str = "avg") -> int:
    """Width of ``pooled_features`` for this encoder and pooling."""
    return encoder.embed_dim * (4 if pool == "concat4" else 1)


class LinearHead(nn.Module):
    """Linear classifier, optionally after ``BatchNorm1d(affine=False)`` (MAE's linear probe)."""

    def __init__(
        self, in_dim: int, num_classes: int, batchnorm: bool = False, init_std: float = 0.01
    ):
        super().__init__()
        self.norm = (
            nn.BatchNorm1d(in_dim, affine=False, eps=HEAD_BN_EPS) if batchnorm else nn.Identity()
        )
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, num_classes) logits."""
        return self.linear(self.norm(feats))


class EncoderClassifier(nn.Module):
    """Encoder + pooling + head; state dict keys ``encoder.*`` and ``head.*``.

    ``load_encoder`` reads the ``encoder.*`` part of such a checkpoint back as a plain encoder.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "avg",
                 batchnorm: bool = False, init_std: float = 2e-5):  # fmt: skip
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.encoder = encoder
        self.pool = pool
        self.head = LinearHead(feature_dim(encoder, pool), num_classes, batchnorm, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.head(pooled_features(self.encoder, x, self.pool))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay, with MAE's ``param_groups_lrd`` rule.

        Embeddings are layer 0, ``blocks.i`` layer ``i + 1``; the final norm and the head fall
        through to the last group (scale 1.0). timm's ViT matcher would put the final norm with
        the last block instead.
        """
        return dict(
            stem=r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
            blocks=r"^encoder\.blocks\.(\d+)",
        )
