"""Multiblock mask sampler: properties over many seeded draws, and the official sampler exactly."""

from __future__ import annotations

import torch
from _official_masks import OfficialMaskCollator

from ijepa_toolkit.configs import find_config
from ijepa_toolkit.masks.multiblock import MaskSection, MultiBlockMaskSampler, random_subsets

GRID = (8, 8)
N = GRID[0] * GRID[1]
DRAWS = 100
BATCH = 6


def _draws(cfg: MaskSection, grid=GRID, draws=DRAWS, batch=BATCH):
    sampler = MultiBlockMaskSampler(grid, cfg)
    g = torch.Generator().manual_seed(123)
    for step in range(draws):
        yield step, sampler, *sampler.sample(batch, step, g)


def test_default_mode_properties_over_many_draws():
    cfg = MaskSection(min_keep=4)
    reach_ctx, reach_tgt = torch.zeros(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)
    for step, sampler, enc, pred in _draws(cfg):
        assert len(enc) == cfg.num_enc_masks and len(pred) == cfg.num_pred_masks
        h, w = sampler.block_size(torch.Generator().manual_seed(step), cfg.pred_mask_scale,
                                  cfg.aspect_ratio)  # fmt: skip
        # block size within scale and aspect range (up to the official integer rounding)
        assert cfg.pred_mask_scale[0] * N - (h + w) <= h * w <= cfg.pred_mask_scale[1] * N + h + w
        assert cfg.aspect_ratio[0] - 0.5 <= h / w <= cfg.aspect_ratio[1] + 0.5
        for m in enc + pred:
            assert m.shape[0] == BATCH and m.dtype == torch.int64  # equal lengths: one tensor
            assert int(m.min()) >= 0 and int(m.max()) < N
        assert pred[0].shape[1] <= h * w
        assert enc[0].shape[1] >= cfg.min_keep
        for b in range(BATCH):
            targets = set(torch.cat([p[b] for p in pred]).tolist())
            for m in enc:
                ctx = m[b].tolist()
                assert len(set(ctx)) == len(ctx), "duplicate context index"
                assert not targets & set(ctx), "context overlaps a target"
                reach_ctx[m[b]] = True
            for p in pred:
                assert len(set(p[b].tolist())) == p.shape[1]
                reach_tgt[p[b]] = True
    assert bool(reach_ctx.all()), f"context never reaches {(~reach_ctx).nonzero().flatten()}"
    assert bool(reach_tgt.all()), f"targets never reach {(~reach_tgt).nonzero().flatten()}"


def test_equal_lengths_by_random_subset_not_tail():
    """The official tail cut always keeps a mask's lowest indices; ours keeps a random subset."""
    masks = torch.zeros(2, 1, 40, dtype=torch.bool)
    masks[0, 0, 10:20] = True
    masks[1, 0, 30:36] = True
    kept = set()
    for seed in range(20):
        (out,) = random_subsets(masks, torch.Generator().manual_seed(seed))
        assert out.shape == (2, 6)
        assert torch.equal(out[1], torch.arange(30, 36))
        assert set(out[0].tolist()) <= set(range(10, 20))
        assert torch.equal(out[0], out[0].sort().values)
        kept.add(tuple(out[0].tolist()))
    assert len(kept) > 1  # a tail cut would give (10, ..., 15) every time


def test_legacy_never_touches_last_row_or_column():
    cfg = MaskSection(min_keep=4, legacy=True)
    last = torch.tensor([i for i in range(N) if i // GRID[1] == GRID[0] - 1 or i % GRID[1] == 7])
    for _, _, enc, pred in _draws(cfg, draws=60):
        for m in enc + pred:
            assert not bool(torch.isin(m, last).any())


def test_legacy_reproduces_official_sampler_exactly():
    kw = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5))
    official = OfficialMaskCollator(input_size=(224, 224), patch_size=16, nenc=1, npred=4,
                                    min_keep=10, **kw)  # fmt: skip
    ours = MultiBlockMaskSampler((14, 14), MaskSection(min_keep=10, legacy=True, **kw))
    for step in range(25):
        torch.manual_seed(1000 + step)
        ref_enc, ref_pred = official(8)
        torch.manual_seed(1000 + step)
        enc, pred = ours.sample(8, step)
        assert len(enc) == len(ref_enc) and len(pred) == len(ref_pred)
        for a, b in zip(enc + pred, ref_enc + ref_pred):
            assert torch.equal(a, b)


def test_impossible_min_keep_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="min_keep"):
        MultiBlockMaskSampler(GRID, MaskSection(min_keep=64))
    sampler = MultiBlockMaskSampler(GRID, MaskSection(min_keep=60), max_tries=5)
    with pytest.raises(RuntimeError, match="min_keep=60"):
        sampler.sample(2, 0, torch.Generator().manual_seed(0))


def test_render_tints_context_and_targets_and_visualize_writes_pngs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from ijepa_toolkit.data.digits import build_digits_imagefolder
    from ijepa_toolkit.masks.render import CONTEXT_RGB, TARGET_RGB, render_masks

    images = torch.zeros(1, 3, 8, 8)  # normalised zeros: the ImageNet mean colour
    enc, pred = [torch.tensor([[0]])], [torch.tensor([[3]])]
    out = np.asarray(render_masks(images, enc, pred, patch_size=4)).astype(float)[2:-2, 2:-2]
    base = np.array([0.485, 0.456, 0.406]) * 255
    assert np.allclose(out[0, 0], 0.5 * base + 0.5 * np.array(CONTEXT_RGB), atol=1)
    assert np.allclose(out[4, 4], 0.5 * base + 0.5 * np.array(TARGET_RGB[0]), atol=1)
    assert np.allclose(out[4, 0], 0.35 * base, atol=1)  # in no mask: dimmed

    train, _ = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=4)
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "visualize.py"), "masks", "--fname",
           str(find_config("pretrain/tiny_cpu")), "--steps", "2", "--out", str(tmp_path),
           f"data.train_folder={train}", "data.digits_root=null"]  # fmt: skip
    env = {"PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["masks_step0.png", "masks_step1.png"]


def test_mask_and_model_sections_check_their_values_with_the_dotted_key():
    import pytest

    from ijepa_toolkit.config import ConfigError, build
    from ijepa_toolkit.pretrain.model import ModelSection

    assert build(MaskSection, {"pred_mask_scale": [1.5e-1, 2e-1]}, "mask").pred_mask_scale == (
        0.15, 0.2,
    )  # fmt: skip
    bad = [
        (MaskSection, "mask", {"pred_mask_scale": [0.5, 0.2]}, "mask.pred_mask_scale must be ["),
        (MaskSection, "mask", {"num_pred_masks": 0}, "mask.num_pred_masks must be >= 1, got 0"),
        (MaskSection, "mask", {"aspect_ratio": [0, 1]}, "mask.aspect_ratio must be [min, max]"),
        (MaskSection, "mask", {"enc_mask_scale": [0.85]}, "mask.enc_mask_scale must be list of 2"),
        (ModelSection, "model", {"stop_sigma": -1}, "model.stop_sigma must be >= 0, got -1.0"),
        (ModelSection, "model",
         {"pred_capacity": 0.6, "pred_repeats": 2, "pred_replacement": False},
         "model.pred_capacity must be <= 1 / pred_repeats (2)"),
        (ModelSection, "model", {"model_name": "vit_mega"}, "model.model_name must be one of ["),
    ]  # fmt: skip
    for cls, where, data, message in bad:
        with pytest.raises(ConfigError) as err:
            build(cls, data, where)
        assert str(err.value).startswith(message), str(err.value)
    ok = build(ModelSection, {"pred_capacity": 0.6, "pred_repeats": 2, "pred_replacement": True})
    assert ok.pred_capacity * ok.pred_repeats > 1
