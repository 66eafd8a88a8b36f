"""ToMe: merges stay within an image, padding merges first, unmerge restores the shape; the
seeds' own outputs (tests/fixtures/featurenorm) are reproduced."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from _featurenorm import SEED_PAD, load, sub_state, toolkit_ids
from _tiny_pretrain import CONFIG, tiny_overrides
from safetensors.torch import load_file
from timm.models.vision_transformer import Block
from torch import nn

from ijepa_toolkit.config import ConfigError, load_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch
from ijepa_toolkit.models.tome import PAD, bipartite_soft_matching, tome_blocks
from ijepa_toolkit.models.vit import EncoderArch, create_encoder
from ijepa_toolkit.models.vit_variants import create_variant_encoder
from ijepa_toolkit.pretrain.model import ContextPath, ModelSection, merged_packed_loss
from ijepa_toolkit.pretrain.packing import (
    PackingSection,
    encode_packed,
    pack,
    packed_loss,
    view_targets,
)
from ijepa_toolkit.pretrain.targets import TargetNorm
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer


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


def _enhanced(name: str) -> dict:
    """Tensors of ``tests/fixtures/ijepa_enhanced_predictor/<name>.safetensors`` (its README)."""
    return load_file(Path(__file__).parent / "fixtures" / "ijepa_enhanced_predictor"
                     / f"{name}.safetensors")  # fmt: skip


def test_predictor_tome_equals_ijepa_enhanced_predictor():
    """Predictor ToMe (``model.pred_tome_rates``, mode ``drop``): 3 merges after each of two
    blocks' attention, tokens that are neither context nor target out of attention and merged
    first (``sequence_mask``), final norm on the merged tokens, then ``unmerge_all``: the
    ``Predictor`` of ijepa_enhanced/vit.py (``TomeBlocks``, theAdamColton/ijepa-enhanced@
    03b6a50ff4cde68be66874f7387ff6cdc8615787) from its block input; compared on the tokens it
    predicts or attends to."""
    f = _enhanced("predictor_tome")
    arch = PredictorArch(grid=6, embed_dim=12, predictor_embed_dim=16, depth=2, num_heads=2,
                         layernorm_eps=1e-5)  # fmt: skip
    pred = IJEPAPredictor(arch, tome_rates=[3, 3]).eval()
    assert pred.tome_mode == "drop"
    state = sub_state(f, "pred.", (("blocks.blocks.", "predictor_blocks."),))
    keep = {k: v for k, v in state.items() if k in pred.state_dict() and k != "mask_token"}
    missing = pred.load_state_dict(keep, strict=False).missing_keys
    assert set(missing) == {"mask_token", "predictor_pos_embed"}
    ids = toolkit_ids(f["sample_ids"]).masked_fill(f["sequence_mask"], PAD)
    with torch.no_grad():
        out = pred.predictor_proj(pred.blocks_forward(f["x0"], ids, _same_sample))
        merged, tome = tome_blocks(pred.predictor_blocks, f["x0"], [3, 3], ids, _same_sample,
                                   "attention", "drop", norm=pred.predictor_norm,
                                   unmerge=False)  # fmt: skip
    real = ids != PAD
    torch.testing.assert_close(out[real], f["out"][real], atol=1e-5, rtol=0)
    assert torch.equal(tome.ids, toolkit_ids(f["merged_ids"]))
    kept = tome.ids != PAD
    torch.testing.assert_close(pred.predictor_proj(merged)[kept], f["merged"][kept], atol=1e-5,
                               rtol=0)  # fmt: skip


@pytest.mark.parametrize("mode", ["drop", "mean"])
def test_kept_merged_tokens_and_merge_all_equal_ijepa_enhanced(mode):
    """``tome_unmerge: false``: the merged tokens (2 blocks, 4 per block, after attention), their
    ids, and ``TomeState.merge_all`` of positions (mean over held tokens) and of a target mask
    (> 0: any held token) equal ``TomeBlocks`` + ``TokenMerger.merge_all`` (ijepa_enhanced/vit.py,
    ijepa_enhanced/tome/tome.py, theAdamColton/ijepa-enhanced@
    03b6a50ff4cde68be66874f7387ff6cdc8615787) as train.py ``compute_loss`` uses them."""
    f = _enhanced(f"no_unmerge_{mode}")
    blocks = nn.Sequential(*[Block(16, 2, qkv_bias=True, norm_layer=nn.LayerNorm)
                             for _ in range(2)]).eval()  # fmt: skip
    blocks.load_state_dict(sub_state(f, "blocks."))
    ids = toolkit_ids(f["sample_ids"])
    with torch.no_grad():
        merged, state = tome_blocks(blocks, f["x"], [4, 4], ids, _same_sample, mode=mode,
                                    unmerge=False)  # fmt: skip
    assert torch.equal(state.ids, toolkit_ids(f["merged_ids"]))
    real = state.ids != PAD
    torch.testing.assert_close(merged[real], f["merged"][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(state.merge_all(f["positions"]), f["merged_positions"],
                               atol=1e-5, rtol=0)  # fmt: skip
    assert torch.equal(state.merge_all(f["target_mask"].float()) > 0, f["merged_target_mask"])
    assert f["merged_target_mask"].any() and not f["merged_target_mask"].all()


def test_no_unmerge_loss_is_the_unmerged_loss_when_only_padding_merges():
    """With rows padded enough that every merge is padding-to-padding, the merged-token loss
    (``merged_packed_loss``) must equal the plain packed loss: the real tokens, their positions,
    which of them are targets and what the predictor sees are the same; a bug in any (e.g.
    IJEPA-Enhanced's own swapped teacher/student position order) changes it."""
    torch.manual_seed(0)
    arch = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    enc = create_encoder(arch).eval()
    target_enc = create_encoder(arch).eval()
    pred = IJEPAPredictor(PredictorArch(grid=4, embed_dim=32, predictor_embed_dim=16, depth=2,
                                        num_heads=2)).eval()  # fmt: skip
    section = PackingSection(enabled=True, min_side=8, max_side=12, ctx_budget=48, tgt_budget=24)
    images = [torch.rand(3, 16, 16) for _ in range(4)]
    b = pack(images, 4, section, torch.Generator().manual_seed(1))
    assert (b.ctx_gsample == PAD).sum(1).min() >= 12 and (b.tgt_gsample == PAD).sum(1).min() >= 8
    norm = TargetNorm("layernorm", 32)
    cfg = ModelSection(tome_rates=[2, 2], target_tome_rates=[3, 3], tome_unmerge=False)
    with torch.no_grad():
        merged_loss, tokens, gsample = merged_packed_loss(
            ContextPath(enc, pred, [2, 2]), target_enc, norm, b, cfg
        )
        full = [torch.cat([getattr(b, f"ctx_{k}"), getattr(b, f"tgt_{k}")], 1)
                for k in ("px", "ids", "gsample")]  # fmt: skip
        target = norm(encode_packed(target_enc, *full, b.grids)[:, b.ctx_ids.shape[1] :])
        plain = packed_loss(ContextPath(enc, pred)(b), *view_targets(target, b), "smooth_l1")
    assert tokens.shape[1] == 48 + 24 - 6 and torch.equal(gsample != PAD, gsample >= 0)
    torch.testing.assert_close(merged_loss, plain, atol=1e-6, rtol=0)
    with torch.no_grad():  # a real merge changes it
        cfg.target_tome_rates = [30, 10]
        moved, _, _ = merged_packed_loss(ContextPath(enc, pred, [2, 2]), target_enc, norm, b, cfg)
    assert abs(float(moved) - float(plain)) > 1e-4


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=4)


def _trainer(digits, folder, **extra) -> Pretrainer:
    opts = {"model.arch": "{embed_dim: 32, depth: 2, num_heads: 2}", "optimization.epochs": 1,
            "logging.rankme_freq": 0, "logging.knn_freq": 0, "packing.enabled": True,
            "packing.ctx_budget": 128, "packing.tgt_budget": 64, **extra}  # fmt: skip
    cfg = load_config(PretrainConfig, CONFIG, tiny_overrides(digits, folder, **opts))
    return Pretrainer(cfg, DistInfo())


@pytest.mark.parametrize("split", ["block", "enhanced_blocks"])
def test_enhanced_tome_recipe_pretrains_on_merged_tokens(digits, tmp_path, split):
    """IJEPA-Enhanced's ToMe settings (``conf/vit-s-patch14.yaml``: ``merge_mode: drop``,
    teacher merging more than the student) with ``should_unmerge: false`` and predictor ToMe:
    a packed step trains the encoder and the predictor."""
    extra = {"model.tome_rates": "[4, 4]", "model.target_tome_rates": "[8, 8]",
             "model.tome_mode": "drop", "model.tome_unmerge": False, "model.pred_depth": 2,
             "model.pred_tome_rates": "[2, 2]", "packing.split": split}  # fmt: skip
    trainer = _trainer(digits, tmp_path, **extra)
    assert trainer.predictor.tome_rates == (2, 2) and trainer.predictor.tome_mode == "drop"
    before = trainer.encoder.blocks[0].attn.qkv.weight.detach().clone()
    row = trainer.train_step(next(iter(trainer.loader))[0])
    assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["grad_norm"] > 0
    assert not torch.equal(trainer.encoder.blocks[0].attn.qkv.weight.detach(), before)
    with pytest.raises(ConfigError, match="tome_unmerge"):
        _trainer(digits, tmp_path / "bad", **{"model.tome_unmerge": False})
    with pytest.raises(ConfigError, match="pred_tome_rates"):
        _trainer(digits, tmp_path / "neg", **{"model.pred_tome_rates": "[-1]"})


def test_predictor_tome_in_the_official_path():
    """``pred_tome_rates`` without packing: zero rates are the official forward; merging keeps
    one prediction per target token and changes them."""
    torch.manual_seed(0)
    arch = PredictorArch(grid=4, embed_dim=32, predictor_embed_dim=16, depth=2, num_heads=2)
    plain = IJEPAPredictor(arch).eval()
    x, ctx, tgt = torch.randn(3, 9, 32), torch.randperm(16)[:9].expand(3, -1), torch.arange(5)
    tgt = tgt.expand(3, -1)
    with torch.no_grad():
        ref = plain(x, ctx, tgt)
        for rates, same in (([0, 0], True), ([3, 2], False)):
            merging = IJEPAPredictor(arch, tome_rates=rates).eval()
            merging.load_state_dict(plain.state_dict())
            out = merging(x, ctx, tgt)
            assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6) == same
