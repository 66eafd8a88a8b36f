"""Depth probe pieces: block choice, dense features, heads, losses; all against direct values."""

from __future__ import annotations

import math

import pytest
import torch

from ijepa_toolkit.eval.depth import gradient_loss, silog_loss
from ijepa_toolkit.models.depth_head import (
    DepthHead,
    default_blocks,
    dense_features,
    resolve_blocks,
)
from ijepa_toolkit.models.vit import EncoderArch, create_encoder


def test_default_blocks_follow_dinov2_and_the_even_rule():
    assert default_blocks(12) == [2, 5, 8, 11]  # ViT-S/B
    assert default_blocks(24) == [4, 11, 17, 23]  # ViT-L (DINOv2's choice)
    assert default_blocks(40) == [9, 19, 29, 39]  # ViT-g
    assert default_blocks(32) == [7, 15, 23, 31]  # ViT-H: evenly spaced, ending at the last
    assert default_blocks(4) == [0, 1, 2, 3]
    assert resolve_blocks("last", None, 32) == [31]
    assert resolve_blocks("four", [9, 3, 5, 1], 12) == [1, 3, 5, 9]
    with pytest.raises(ValueError, match="4 distinct block indices in \\[0, 11\\]"):
        resolve_blocks("four", [1, 2, 3, 12], 12)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        default_blocks(3)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_blocks("all", None, 12)


def test_dense_features_equal_a_direct_computation():
    torch.manual_seed(0)
    enc = create_encoder(EncoderArch(img_size=32, patch_size=8, embed_dim=16, depth=4,
                                     num_heads=2)).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 24)  # a 2x3 grid, not the pretraining one
    with torch.no_grad():
        tokens = enc._pos_embed(enc.patch_embed(x))
        maps = []
        for blk in enc.blocks:
            tokens = blk(tokens)
            maps.append(enc.norm(tokens).transpose(1, 2).reshape(2, 16, 2, 3))
        got = dense_features(enc, x, [1, 3], pooled_token=True)
    assert got.shape == (2, 4 * 16, 2, 3)
    pooled1 = maps[1].mean(dim=(2, 3), keepdim=True).expand(-1, -1, 2, 3)
    pooled3 = maps[3].mean(dim=(2, 3), keepdim=True).expand(-1, -1, 2, 3)
    direct = torch.cat([maps[1], pooled1, maps[3], pooled3], dim=1)
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-5)
    with torch.no_grad():
        last = dense_features(enc, x, [3], final_norm=True)
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), enc.forward_features(x))


def test_bins_head_expectation_by_hand():
    head = DepthHead(3, "bins", min_depth=1.0, max_depth=4.0, n_bins=4, batchnorm=False,
                     upsample=1)  # fmt: skip
    assert head.centres.tolist() == [1.0, 2.0, 3.0, 4.0]
    feats = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        head.conv.weight.zero_()
        out = head(feats, (2, 2))
        assert torch.allclose(out, torch.full_like(out, 2.5))  # uniform weights: mean of bins
        head.conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.7]))  # relu + 0.1: .1 .1 .1 .8
        out = head(feats, (4, 6))
    assert out.shape == (2, 1, 4, 6)
    expected = (0.1 * 1 + 0.1 * 2 + 0.1 * 3 + 0.8 * 4) / 1.1
    torch.testing.assert_close(out, torch.full_like(out, expected))


def test_linear_head_is_exp_of_a_1x1_conv_then_upsampled():
    head = DepthHead(2, "linear", min_depth=1e-3, max_depth=10.0, batchnorm=False, upsample=2)
    feats = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]]]])  # (1, 2, 1, 2)
    with torch.no_grad():
        head.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
        head.conv.bias.fill_(0.0)
        out = head(feats, (2, 4))
    # logits 1.0 and 2.0; x2 bilinear (half-pixel centres) gives 1, 1.25, 1.75, 2 on each row
    row = torch.exp(torch.tensor([1.0, 1.25, 1.75, 2.0]))
    torch.testing.assert_close(out[0, 0], torch.stack([row, row]))
    fresh = DepthHead(2, "linear", min_depth=1e-3, max_depth=10.0)
    assert float(fresh.conv.bias.detach()) == pytest.approx(math.log(5.0005))
    with pytest.raises(ValueError, match="expected one of"):
        DepthHead(2, "mlp")


def test_silog_loss_by_hand():
    gt = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]])
    mask = gt > 0
    pred = gt * 2 + (~mask) * 100.0  # the invalid pixel must not count
    ln2 = math.log(2)
    assert float(silog_loss(pred, gt, mask, 0.85)) == pytest.approx(ln2 * math.sqrt(0.15))
    assert float(silog_loss(pred, gt, mask, 1.0)) == pytest.approx(0.0, abs=1e-5)
    pred = torch.tensor([[[[1.0, 2.0], [4.0 * math.e, 5.0]]]])  # d = 0, 0, 1
    expected = math.sqrt(1 / 3 - 0.85 * (1 / 3) ** 2)
    assert float(silog_loss(pred, gt, mask, 0.85)) == pytest.approx(expected)


def test_gradient_loss_by_hand():
    gt = torch.ones(1, 1, 2, 2)
    mask = torch.ones_like(gt, dtype=torch.bool)
    assert float(gradient_loss(gt * 3.0, gt, mask)) == pytest.approx(0.0, abs=1e-6)
    a = 0.5
    pred = torch.tensor([[[[1.0, math.exp(a)], [1.0, 1.0]]]])
    # scale 1: |r| differences: vertical (0, a), horizontal (a, 0) -> 2a / 4 pixels; scale 2: 0
    assert float(gradient_loss(pred, gt, mask, scales=2)) == pytest.approx(2 * a / 4)
    mask[0, 0, 0, 1] = False  # the odd pixel is invalid: no pair touches it
    assert float(gradient_loss(pred, gt, mask, scales=2)) == pytest.approx(0.0, abs=1e-6)
