"""ToMe: merges stay within an image, padding merges first, unmerge restores the shape; the
seeds' own outputs (tests/fixtures/featurenorm) are reproduced."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _featurenorm import SEED_PAD, load, sub_state, toolkit_ids
from timm.models.vision_transformer import Block
from torch import nn

from ijepa_toolkit.models.tome import PAD, bipartite_soft_matching, tome_blocks
from ijepa_toolkit.models.vit import EncoderArch, create_encoder
from ijepa_toolkit.models.vit_variants import create_variant_encoder
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


def test_two_merge_steps_equal_featurenorm_token_merger():
    """Unweighted mean merges, padding first, over two steps: the outputs of featurenorm's
    ``create_token_merger`` + ``merge(mode="mean")`` + ``unmerge_all`` (src/tome.py,
    theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3)."""
    f = load("tome_fn")
    merge1, unmerge1, ids1 = bipartite_soft_matching(f["keys1"], 4, toolkit_ids(f["ids"]))
    x1 = merge1(f["x"])
    torch.testing.assert_close(x1, f["merged1"], atol=1e-5, rtol=0)
    merge2, unmerge2, ids2 = bipartite_soft_matching(f["keys2"], 3, ids1)
    x2 = merge2(x1)
    torch.testing.assert_close(x2, f["merged2"], atol=1e-5, rtol=0)
    assert torch.equal(ids2, toolkit_ids(f["ids2"]))
    torch.testing.assert_close(unmerge1(unmerge2(x2)), f["unmerged"], atol=1e-5, rtol=0)


def _same_sample(ids: torch.Tensor) -> torch.Tensor:
    return (ids[:, :, None] == ids[:, None, :]).unsqueeze(1)


def test_merging_after_the_block_equals_the_featurenorm_encoder():
    """Merges after the whole block, keys after the qk-norm averaged over heads, rates 6 then 5
    (featurenorm ``tome_layerwise_merge_rate=0.2`` on 32 tokens): the ``Encoder`` of src/model.py
    (theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3) with
    its weights in timm blocks; compared on the non-padding tokens."""
    f = load("tome_featurenorm_encoder")
    blocks = nn.Sequential(*[
        Block(16, 2, qkv_bias=False, qk_norm=True, norm_layer=nn.LayerNorm,
              act_layer=partial(nn.GELU, approximate="tanh"))
        for _ in range(2)
    ]).eval()  # fmt: skip
    rename = (("attention.proj_qkv", "attn.qkv"), ("attention.proj_out", "attn.proj"),
              ("attention.", "attn."))  # fmt: skip
    state = sub_state(f, "blocks.", rename)
    for i in range(2):  # the seed's output projection has no bias
        state[f"{i}.attn.proj.bias"] = torch.zeros(16)
    blocks.load_state_dict(state)
    ids = toolkit_ids(f["sample_ids"])
    with torch.no_grad():
        out = tome_blocks(blocks, f["h0"], f["rates"].tolist(), ids, _same_sample,
                          placement="block")  # fmt: skip
    real = f["sample_ids"] != SEED_PAD
    torch.testing.assert_close(out[real], f["out"][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["mean", "drop"])
def test_merging_after_attention_equals_ijepa_enhanced_tome_blocks(mode):
    """Merges after the attention residual (before the MLP), keys averaged over heads, 4 tokens
    per block, ``mean`` and ``drop`` modes: ``TomeBlocks`` of ijepa_enhanced/vit.py with
    ``TokenMerger`` (ijepa_enhanced/tome/tome.py,
    theAdamColton/ijepa-enhanced@03b6a50ff4cde68be66874f7387ff6cdc8615787), then
    ``unmerge_all``; compared on the non-padding tokens."""
    f = load(f"tome_enhanced_{mode}")
    blocks = nn.Sequential(*[
        Block(16, 2, qkv_bias=True, init_values=1.0, norm_layer=nn.LayerNorm) for _ in range(2)
    ]).eval()  # fmt: skip
    blocks.load_state_dict(sub_state(f, "blocks."))
    ids = toolkit_ids(f["sample_ids"])
    with torch.no_grad():
        out = tome_blocks(blocks, f["x"], [4, 4], ids, _same_sample, placement="attention",
                          mode=mode)  # fmt: skip
    real = f["sample_ids"] != SEED_PAD
    torch.testing.assert_close(out[real], f["out"][real], atol=1e-5, rtol=0)


def test_tome_with_rope_merges_positions_and_keeps_images_apart():
    """RoPE + ToMe (formerly an error): positions merge with the tokens, as featurenorm's
    ``Encoder.forward`` merges ``position_ids`` and recomputes RoPE (src/model.py,
    theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3)."""
    torch.manual_seed(0)
    arch = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    enc = create_variant_encoder(arch, pos_kind="rope").eval()
    section = PackingSection(enabled=True, min_side=8, max_side=16, ctx_budget=48, tgt_budget=12)
    imgs = [torch.rand(3, 16, 16) for _ in range(6)]
    b = pack(imgs, 4, section, torch.Generator().manual_seed(0))
    first = b.rows[0][0]
    with torch.no_grad():
        out = encode_packed(enc, b.ctx_px, b.ctx_ids, b.ctx_gsample, b.grids, [3, 3],
                            tome_placement="block")  # fmt: skip
        assert enc.rope.pos.shape == (len(b.rows), 48 - 6, 2)
        px = b.ctx_px.clone()
        px[b.ctx_gsample == first] += 3.0
        out2 = encode_packed(enc, px, b.ctx_ids, b.ctx_gsample, b.grids, [3, 3],
                             tome_placement="block")  # fmt: skip
    others = (b.ctx_gsample != first) & (b.ctx_gsample != PAD)
    assert torch.isfinite(out).all() and torch.allclose(out[others], out2[others], atol=1e-5)
