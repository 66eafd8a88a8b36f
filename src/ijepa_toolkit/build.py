"""Build the encoder a config names: a checkpoint of any supported format, or a random init."""

from __future__ import annotations

from .config import EncoderSection
from .errors import ConfigError
from .loader import load_encoder
from .models.vit import EncoderArch, IJEPAVisionTransformer, create_encoder, heads_for_width


def build_encoder(section: EncoderSection, drop_path_rate: float = 0.0) -> IJEPAVisionTransformer:
    """The encoder of ``section``: loaded from ``checkpoint``, or ``arch`` at random init.

    ``drop_path_rate`` sets stochastic depth in the blocks (0 -> rate linearly, timm's rule).
    """
    if section.checkpoint:
        return load_encoder(
            section.checkpoint, which=section.which, num_heads=section.num_heads,
            pos_embed=section.pos_embed, drop_path_rate=drop_path_rate,
        )  # fmt: skip
    if not section.arch:
        raise ConfigError("model.checkpoint or model.arch must be set")
    try:
        arch = EncoderArch(**section.arch)
    except TypeError as e:
        raise ConfigError(f"model.arch: {e}") from None
    try:
        heads_for_width(arch.embed_dim, arch.num_heads)
    except ValueError as e:
        raise ConfigError(f"model.arch: {e}") from None
    kind = "learned" if section.pos_embed == "learned" else "sincos"
    return create_encoder(arch, pos_embed_kind=kind, drop_path_rate=drop_path_rate).eval()
