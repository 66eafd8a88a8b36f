"""Pooling and heads: concat4 against a direct computation from the blocks."""

from __future__ import annotations

import torch
from _direct import concat4_by_hand

from ijepa_toolkit.models.heads import EncoderClassifier, feature_dim, pooled_features
from ijepa_toolkit.models.vit import EncoderArch, create_encoder


def tiny_encoder(depth=5):
    torch.manual_seed(0)
    arch = EncoderArch(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=4)
    return create_encoder(arch).eval()


def test_concat4_equals_direct_computation():
    enc = tiny_encoder()
    x = torch.randn(2, 3, 32, 32)
    direct = concat4_by_hand(enc, x)
    with torch.no_grad():
        got = pooled_features(enc, x, "concat4")
    assert got.shape == (2, 4 * 32) == (2, feature_dim(enc, "concat4"))
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-6)


def test_avg_is_model_output_and_classifier_shapes():
    enc = tiny_encoder()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(enc, x, "avg"), enc(x))
    clf = EncoderClassifier(enc, num_classes=7, pool="concat4", batchnorm=True)
    assert clf(x).shape == (3, 7)
    assert {k.split(".")[0] for k in clf.state_dict()} == {"encoder", "head"}
