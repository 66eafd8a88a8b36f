"""Build the encoder a config names: a checkpoint of any supported format, or a random init."""

from __future__ import annotations

from .checkpoint import load_encoder
from .config import ConfigError, EncoderSection
from .models.vit import EncoderArch, IJEPAVisionTransformer, create_encoder, heads_for_width


def build_encoder(section: EncoderSection, drop_path_rate: float = 0.0) -> IJEPAVisionTransformer:
    """The encoder of ``section``: loaded from ``checkpoint``, or ``arch`` at random init.

    ``drop_path_rate`` sets stochastic depth in the blocks (linearly increasing, as timm).
    """
    if section.checkpoint:
        model = load_encoder(
            section.checkpoint, which=section.which, num_heads=section.num_heads,
            pos_embed=section.pos_embed,
        )  # fmt: skip
        if drop_path_rate:
            set_drop_path(model, drop_path_rate)
        return model
    if not section.arch:
        raise ConfigError("model.checkpoint or model.arch must be set")
    try:
        arch = EncoderArch(**section.arch)
    except TypeError as e:
        raise ConfigError(f"model.arch: {e}") from None
    heads_for_width(arch.embed_dim, arch.num_heads)
    kind = "learned" if section.pos_embed == "learned" else "sincos"
    return create_encoder(arch, pos_embed_kind=kind, drop_path_rate=drop_path_rate).eval()


def set_drop_path(model: IJEPAVisionTransformer, rate: float) -> None:
    """Stochastic depth in every block, increasing linearly from 0 to ``rate`` (timm's rule)."""
    from timm.layers import DropPath
    from torch import nn

    depth = len(model.blocks)
    for i, block in enumerate(model.blocks):
        r = rate * i / max(depth - 1, 1)
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
