"""Encoder options: 2D RoPE, factorised row+column positions, register tokens."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ijepa_toolkit import encode_masked, load_encoder, save_checkpoint
from ijepa_toolkit.models.heads import pooled_features
from ijepa_toolkit.models.vit import EncoderArch, apply_masks
from ijepa_toolkit.models.vit_variants import Rope2D, create_variant_encoder

ARCH = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)
OPTIONS = [("rope", 0), ("factorized", 0), ("learned", 2), ("rope", 3), ("sincos", 1)]


def _encoder(pos_kind: str, regs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_variant_encoder(ARCH, pos_kind, regs).eval()


def _dots(rope: Rope2D, q, k, pq, pk) -> torch.Tensor:
    qr = rope.rotate(q, rope.angles(torch.tensor([[pq]], dtype=torch.float)))
    kr = rope.rotate(k, rope.angles(torch.tensor([[pk]], dtype=torch.float)))
    return (qr * kr).sum(-1)


def test_rope_depends_only_on_relative_position():
    rope = Rope2D(head_dim=16, grid=(4, 4))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    base = _dots(rope, q, k, (1.0, 2.0), (3.0, 0.0))
    shifted = _dots(rope, q, k, (5.0, -3.0), (7.0, -5.0))  # both moved by (4, -5)
    assert torch.allclose(base, shifted, atol=1e-5)
    for other in [(1.0, 2.0), (3.0, 1.0), (2.0, 0.0)]:  # another offset along either axis
        assert not torch.allclose(base, _dots(rope, q, k, (1.0, 2.0), other), atol=1e-3)
    # the rotation keeps norms; half of the head dimension turns with each axis
    x = torch.randn(1, 1, 1, 16)
    assert torch.allclose(
        rope.rotate(x, rope.angles(torch.tensor([[[3.0, 5.0]]]))).norm(), x.norm()
    )
    assert torch.allclose(rope.freqs[1] ** -4, torch.tensor(10000.0))


def test_rope_attention_sees_positions():
    enc = _encoder("rope", 0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = enc.forward_features(x)
        enc.rope.freqs.zero_()  # no rotation: the encoder becomes permutation-equivariant
        b = enc.forward_features(x)
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("pos_kind,regs", OPTIONS)
def test_variant_contract_and_load_encoder_round_trip(tmp_path, pos_kind, regs):
    enc = _encoder(pos_kind, regs)
    assert isinstance(enc, VisionTransformer)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = enc.forward_features(x)
        pooled = enc(x)
        other = enc.forward_features(torch.randn(2, 3, 12, 8))  # another grid and aspect
    assert tokens.shape == (2, 16, 32) and other.shape == (2, 6, 32)
    assert torch.allclose(pooled, tokens.mean(1), atol=1e-6)  # registers are not pooled
    if regs:
        assert enc.reg_token.shape == (1, regs, 32)
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"target_encoder": enc.state_dict(), "epoch": 1}, path)
    loaded = load_encoder(path, num_heads=2)
    assert type(loaded) is type(enc) and loaded.pos_kind == pos_kind
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), tokens, atol=1e-6)
        feats = pooled_features(loaded, x, "concat4")
    assert feats.shape == (2, 128) and torch.isfinite(feats).all()


@pytest.mark.parametrize("pos_kind,regs", [("rope", 0), ("rope", 2), ("factorized", 1)])
def test_masked_encoding_matches_positions_of_the_kept_patches(pos_kind, regs):
    """All-patches masks give the full forward; a subset is the same as the subset's images."""
    enc = _encoder(pos_kind, regs)
    x = torch.randn(2, 3, 16, 16)
    everything = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        full = enc.forward_features(x)
        assert torch.allclose(encode_masked(enc, x, everything), full, atol=1e-5)
        keep = torch.tensor([[0, 1, 4, 5], [10, 11, 14, 15]])  # top-left, bottom-right 2x2
        part = encode_masked(enc, x, [keep])
        # 8x8 crops: the second starts at patch (2, 2), not (0, 0). Factorised tables index by
        # absolute patch, so the top-left crop sees the same positions; only RoPE without
        # registers (registers are not rotated: they see absolute positions) is translation
        # invariant
        crop = enc.forward_features(torch.stack([x[0, :, :8, :8], x[1, :, 8:, 8:]]))
    assert part.shape == (2, 4, 32)
    assert torch.allclose(part[0], crop[0], atol=1e-5)
    assert torch.allclose(part[1], crop[1], atol=1e-5) == (pos_kind == "rope" and not regs)
    assert apply_masks(full, keep).shape == part.shape
