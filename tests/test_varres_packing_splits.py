"""Packed context/target splits against the seeds' own samplers
(tests/fixtures/featurenorm_packing, see its README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ijepa_toolkit.pretrain.packing import PAD, PackingSection, pack
from ijepa_toolkit.pretrain.packing_split import (
    context_window_bounds,
    enhanced_masks,
    enhanced_split,
    featurenorm_split,
    window_split,
)

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "featurenorm_packing"
FIXTURE = load_file(FIXTURE_DIR / "splits.safetensors")
FN_CASES = range(6)


@pytest.mark.parametrize("case", FN_CASES)
def test_window_split_equals_featurenorm_context_target_splitter(case):
    """Given the seed's drawn context window count and its ``torch_rng`` seed, the split is the
    seed's token for token: ``ContextTargetSplitter.__call__`` (src/dataset.py,
    theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3)
    shuffles the 2x2 windows with ``torch.randperm`` and takes the first ``n`` as context."""
    f = FIXTURE
    nph, npw, _ = f[f"fn{case}_case"].tolist()
    for s in range(3):
        ctx, tgt = f[f"fn{case}_s{s}_ctx"], f[f"fn{case}_s{s}_tgt"]
        gen = torch.Generator().manual_seed(int(f[f"fn{case}_s{s}_torch_seed"]))
        perm = torch.randperm((nph // 2) * (npw // 2), generator=gen)
        got_ctx, got_tgt = window_split(nph, npw, 2, len(ctx) // 4, perm)
        assert torch.equal(got_ctx, ctx) and torch.equal(got_tgt, tgt)
        rows_cols = torch.stack([got_ctx // npw, got_ctx % npw], -1)
        assert torch.equal(rows_cols, f[f"fn{case}_s{s}_ctxpos"])


@pytest.mark.parametrize("case", FN_CASES)
def test_context_window_count_has_the_seed_range_and_mean(case):
    """The context window count: the seed's 400 draws (python ``random.randint``) span exactly
    ``context_window_bounds`` (1 of 2 windows; the cap ``max_context_sequence_length // 4``;
    ``hi`` when ``lo >= hi``), and the toolkit's 400 draws (``torch.randint``) have the same
    support and a mean within 0.6 windows (uniform counts: about 3.5 standard errors)."""
    f = FIXTURE
    nph, npw, mx = f[f"fn{case}_case"].tolist()
    fraction = f[f"fn{case}_caps"].tolist()
    seed = f[f"fn{case}_counts"]
    total = (nph // 2) * (npw // 2)
    lo, hi = context_window_bounds(total, 2, fraction, mx)
    expect = (1, 1) if total == 2 else (min(lo, hi), hi)
    assert (int(seed.min()), int(seed.max())) == expect
    gen = torch.Generator().manual_seed(case)
    ours = torch.tensor([len(featurenorm_split(nph, npw, 2, fraction, mx, gen)[0]) // 4
                         for _ in range(400)])  # fmt: skip
    assert set(ours.tolist()) == set(seed.tolist())
    assert abs(ours.float().mean() - seed.float().mean()) < 0.6


def test_featnorm_small_budgets_are_the_seed_packer_lengths():
    """``ContextTargetDatasetConfig`` of conf/small.yaml derives the packer's context length
    (128), target length (192) and resize multiple (32 px); featnorm_small.yaml uses them."""
    from ijepa_toolkit.config import load_config
    from ijepa_toolkit.pretrain.train import PretrainConfig

    cfg = load_config(PretrainConfig, "pretrain/featnorm_small", [])
    ctx, tgt, multiple = FIXTURE["small_budgets"].tolist()
    p = cfg.packing
    assert (p.ctx_budget, p.tgt_budget, cfg.model.patch_size * p.window) == (ctx, tgt, multiple)


@pytest.mark.parametrize("case", range(5))
def test_enhanced_masks_equal_make_context_prediction_masks(case):
    """Same generator, same rectangles: ``make_context_prediction_masks`` with the default
    ``MakeContextPredMaskArgs`` (ijepa_enhanced/mask.py,
    theAdamColton/ijepa-enhanced@03b6a50ff4cde68be66874f7387ff6cdc8615787) on full grids and on
    the patches a 20 % drop kept. The seed passes ``pred_scale_ceil`` (0.2) as the aspect
    ceiling, so its aspect is drawn as ``0.75 + (0.2 - 0.75) * u``: target_aspect [0.75, 0.2]."""
    f = FIXTURE
    h, w = f[f"enh{case}_grid"].tolist()
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    for s in range(3):
        gen = torch.Generator().manual_seed(1000 * case + s)
        got = enhanced_masks(rows, cols, 4, [0.15, 0.2], [0.75, 0.2], gen)
        assert torch.equal(got, f[f"enh{case}_s{s}"])
    keep = f[f"enh{case}_keep"]
    gen = torch.Generator().manual_seed(77 + case)
    got = enhanced_masks(rows[keep], cols[keep], 4, [0.15, 0.2], [0.75, 0.2], gen)
    assert torch.equal(got, f[f"enh{case}_kept"])


@pytest.mark.parametrize("case", range(3))
def test_enhanced_drop_keeps_the_seed_token_dropper_patches(case):
    """``TokenDropper(drop_chance=0.2)`` (ijepa_enhanced/data.py, commit above) keeps the
    patches whose ``torch.rand`` exceeds 0.2: the same patches as ``enhanced_split``'s drop from
    the same generator (the context and target together are the kept patches)."""
    n = int(FIXTURE[f"drop{case}_n"])
    h = {16: 4, 96: 8, 289: 17}[n]
    section = PackingSection(split="enhanced_blocks", drop_chance=0.2, ctx_budget=10**4,
                             tgt_budget=10**4, target_scale=[0.15, 0.2],
                             target_aspect=[0.75, 0.2])  # fmt: skip
    gen = torch.Generator().manual_seed(300 + case)
    ctx, tgt, blocks = enhanced_split(h, n // h, section, gen)
    kept = torch.cat([ctx, tgt]).sort().values
    assert torch.equal(kept, FIXTURE[f"drop{case}_kept"])
    assert blocks.shape == (len(tgt), 4) and bool(blocks.any(-1).all())


def test_packed_splits_cover_each_image_once_and_keep_windows_whole():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 16 + 8 * (i % 3), 32 - 8 * (i % 2), generator=g) for i in range(9)]
    for split in ("featurenorm_windows", "enhanced_blocks"):
        section = PackingSection(enabled=True, split=split, window=2, min_side=16, max_side=32,
                                 ctx_budget=64, tgt_budget=64, target_scale=[0.15, 0.2],
                                 target_aspect=[0.75, 0.2])  # fmt: skip
        batch = pack(images, 4, section, torch.Generator().manual_seed(1))
        for i, (gh, gw) in enumerate(batch.grids):
            c = batch.ctx_ids[batch.ctx_gsample == i][:, 2:]
            t = batch.tgt_ids[batch.tgt_gsample == i][:, 2:]
            patches = torch.cat([c, t])
            assert len(c) >= 1 and len(t) >= 1
            assert len({tuple(p) for p in patches.tolist()}) == len(patches) == gh * gw
            if split == "featurenorm_windows":  # every 4 consecutive context tokens: a window
                win = (c // 2).reshape(-1, 4, 2)
                assert bool((win == win[:, :1]).all())
                assert 0.25 * (gh * gw) - 4 <= len(c) <= 0.5 * (gh * gw) + 4
        if split == "enhanced_blocks":
            assert batch.tgt_blocks.shape == (len(batch.rows), 64, 4)
            assert not batch.tgt_blocks[batch.tgt_gsample == PAD].any()
            assert bool(batch.tgt_blocks[batch.tgt_gsample != PAD].any(-1).all())


def test_enhanced_copies_predict_each_rectangle_with_the_context_alone():
    """Copy ``j`` of a row = the context + rectangle ``j``'s mask tokens only (Enhanced's
    ``predictor_sequence_mask``): its predictions equal a row whose other target tokens are
    padding; the loss's targets are repeated per copy and count each rectangle's tokens."""
    from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch
    from ijepa_toolkit.models.vit import EncoderArch, create_encoder
    from ijepa_toolkit.pretrain.packing import encode_packed, predict_batch, view_targets

    torch.manual_seed(0)
    enc = create_encoder(EncoderArch(img_size=32, patch_size=4, embed_dim=32, depth=1,
                                     num_heads=2)).eval()  # fmt: skip
    pred = IJEPAPredictor(PredictorArch(grid=8, embed_dim=32, predictor_embed_dim=16, depth=1,
                                        num_heads=2)).eval()  # fmt: skip
    section = PackingSection(enabled=True, split="enhanced_blocks", min_side=16, max_side=32,
                             ctx_budget=64, tgt_budget=64, target_scale=[0.15, 0.2],
                             target_aspect=[0.75, 0.2])  # fmt: skip
    images = [torch.rand(3, 32, 32) for _ in range(5)]
    batch = pack(images, 4, section, torch.Generator().manual_seed(2))
    r = len(batch.rows)
    with torch.no_grad():
        ctx = encode_packed(enc, batch.ctx_px, batch.ctx_ids, batch.ctx_gsample, batch.grids)
        z = predict_batch(pred, ctx, batch)
        only = batch.tgt_blocks[..., 1] & (batch.tgt_gsample != PAD)
        alone = pack(images, 4, section, torch.Generator().manual_seed(2))
        alone.tgt_gsample = alone.tgt_gsample.masked_fill(~only, PAD)
        alone.tgt_ids[..., 0] = alone.tgt_ids[..., 0].masked_fill(~only, PAD)
        alone.tgt_blocks = None
        z_alone = predict_batch(pred, ctx, alone)
    assert z.shape == (4 * r, 64, 32)
    torch.testing.assert_close(z[r : 2 * r][only], z_alone[only], atol=1e-5, rtol=0)
    target = torch.randn(r, 64, 32)
    t, gsample = view_targets(target, batch)
    assert torch.equal(t[r : 2 * r], target)
    assert int((gsample != PAD).sum()) == int(batch.tgt_blocks.sum())


@pytest.mark.parametrize(
    "extra, message",
    [({"model.pred_window": 2, "model.pred_capacity": 0.5}, "packing.split=featurenorm_windows"),
     ({"packing.split": "enhanced_blocks", "model.pred_repeats": 2}, "pred_repeats=1"),
     ({"model.moe_experts": 2, "model.tome_rates": "[1, 1, 1, 1]"}, "without ToMe")],
)  # fmt: skip
def test_packing_refuses_what_rows_cannot_do(extra, message):
    from ijepa_toolkit.config import load_config
    from ijepa_toolkit.errors import ConfigError
    from ijepa_toolkit.pretrain.train import PretrainConfig, check_values

    over = [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(PretrainConfig, "pretrain/varres_digits", over)
    with pytest.raises(ConfigError, match=message):
        check_values(cfg)


@pytest.mark.parametrize("case", range(5))
def test_enhanced_crop_equals_the_seed_random_crop(case):
    """``packing.resize: enhanced_crop``: the crop ijepa-enhanced's ``RandomCrop(70, 238, 14,
    448)`` (ijepa_enhanced/data.py: ``get_resized_h_w``, then torchvision's ``RandomCrop``;
    theAdamColton/ijepa-enhanced@03b6a50ff4cde68be66874f7387ff6cdc8615787) takes after
    ``torch.manual_seed(s)`` -- top, left, height, width -- from a generator seeded the same."""
    from ijepa_toolkit.pretrain.packing_split import enhanced_crop

    f = load_file(FIXTURE_DIR / "crop.safetensors")
    h, w = f[f"crop{case}_hw"].tolist()
    image = torch.arange(h * w, dtype=torch.float64).reshape(1, h, w)
    for s in range(3):
        crop = enhanced_crop(image, 70, 238, 14, torch.Generator().manual_seed(500 + 10 * case + s))
        first = int(crop[0, 0, 0])
        got = [first // w, first % w, crop.shape[1], crop.shape[2]]
        assert got == f[f"crop{case}_s{s}"].tolist()


def test_diffmoe_padding_equals_the_seed_padding_mask():
    """Packed rows tell the DiffMoE MLPs their padding: two training steps and eval equal
    ``DiffMoeMLP(x, padding_mask=...)`` of diffmoe/diffmoe.py
    (theAdamColton/diffmoe@faf2b49ff5ba8ea64292f712f443016a5692ff70): padding gate 0, out of the
    BCE (mean over the other tokens), never routed in eval; the padding inputs are 50.0."""
    from test_varres_diffmoe import _seed_moe

    f = load_file(FIXTURE_DIR / "diffmoe_padding.safetensors")
    moe, norm = _seed_moe(f)
    moe.padding = f["padding"]
    for step, training in ((1, True), (2, True), (3, False)):
        x = f[f"x{step}"]
        with torch.set_grad_enabled(training):
            y = x + moe.train(training)(norm(x))
        torch.testing.assert_close(y, f[f"y{step}"], atol=1e-5, rtol=0)
        if training:  # the BCE and the thresholds' moving average of the step
            got = torch.stack([moe.aux_loss, *moe.threshold])
            want = torch.stack([f[f"loss{step}"], *f[f"th{step}"]])
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
