"""ToMe: merges stay within an image, padding merges first, unmerge restores the shape."""

from __future__ import annotations

import pytest
import torch

from ijepa_toolkit.models.tome import PAD, bipartite_soft_matching, tome_blocks
from ijepa_toolkit.models.vit import EncoderArch, create_encoder
from ijepa_toolkit.pretrain.packing import PackingSection, encode_packed, pack


def _groups(merge, n: int, batch: int = 1) -> list:
    """Which input tokens each merged token of row 0 holds (merge of the identity, sums)."""
    eye = torch.eye(n).expand(batch, -1, -1)
    return [set(row.nonzero().squeeze(1).tolist()) for row in merge(eye)[0]]


def test_merges_stay_within_one_image_and_padding_goes_first():
    torch.manual_seed(0)
    ids = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1, 2, 2, PAD, PAD, PAD, PAD, 2, 2]])
    metric = torch.randn(1, 16, 8)
    metric[0, 1::2] = metric[0, ::2] + 0.01 * torch.randn(8, 8)  # cross-image twins: tempting
    for r in (1, 2, 3, 4):  # image 0 (even) has no same-image partner among the odd tokens
        merge, unmerge, new_ids = bipartite_soft_matching(metric, r, ids)
        groups = _groups(merge, 16)
        assert len(groups) == 16 - r and sorted(i for g in groups for i in g) == list(range(16))
        for g in groups:
            assert len({int(ids[0, i]) for i in g}) == 1  # one image (or padding) per token
        merged = [g for g in groups if len(g) > 1]
        if r <= 2:  # two padding pairs exist: they merge before any image token
            assert all(int(ids[0, min(g)]) == PAD for g in merged)
        assert sorted(new_ids[0].tolist()) == sorted(ids[0, [min(g) for g in groups]].tolist())
    with pytest.raises(ValueError, match="same-image pairs"):  # 4 same-image pairs only
        bipartite_soft_matching(metric, 5, ids)


def test_unmerge_restores_shape_and_copies_merged_values():
    x = torch.randn(2, 10, 4)
    merge, unmerge, _ = bipartite_soft_matching(torch.randn(2, 10, 6), 3)
    merged = merge(x)
    assert merged.shape == (2, 7, 4)
    back = unmerge(merged)
    assert back.shape == x.shape
    groups = _groups(merge, 10, batch=2)
    for j, g in enumerate(groups):
        for i in g:
            assert torch.allclose(back[0, i], merged[0, j])
    with pytest.raises(ValueError, match="same-image pairs"):
        bipartite_soft_matching(torch.randn(1, 4, 3), 2, torch.tensor([[0, 1, 0, 1]]))


def test_tome_blocks_zero_rate_is_the_plain_encoder_and_packed_rows_stay_isolated():
    torch.manual_seed(0)
    enc = create_encoder(EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                     num_heads=2)).eval()  # fmt: skip
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.allclose(tome_blocks(enc.blocks, x, [0, 0]), enc.blocks(x), atol=1e-6)
        assert tome_blocks(enc.blocks, x, [4, 2]).shape == x.shape
    section = PackingSection(enabled=True, min_side=8, max_side=16, ctx_budget=48, tgt_budget=12)
    imgs = [torch.rand(3, 16, 16) for _ in range(6)]
    b = pack(imgs, 4, section, torch.Generator().manual_seed(0))
    row = max(range(len(b.rows)), key=lambda r: len(b.rows[r]))
    first = b.rows[row][0]
    with torch.no_grad():
        out = encode_packed(enc, b.ctx_px, b.ctx_ids, b.ctx_gsample, b.grids, [3, 3])
        px = b.ctx_px.clone()
        px[b.ctx_gsample == first] += 3.0
        out2 = encode_packed(enc, px, b.ctx_ids, b.ctx_gsample, b.grids, [3, 3])
    assert out.shape == (len(b.rows), 48, 32)
    others = (b.ctx_gsample != first) & (b.ctx_gsample != PAD)
    # merges never mix images; the r merges of a row are ranked row-wide, here all padding pairs
    # (every row has padding to spare), so the other images are untouched
    assert (b.ctx_gsample == PAD).sum(1).min() >= 6
    assert torch.allclose(out[others], out2[others], atol=1e-5)
