"""visualize.py pca / losses: PNG sizes, panels that are the input images, non-blank patch maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_toolkit import load_predictor
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.viz import (
    GAP,
    LossesSection,
    VizDataSection,
    load_images,
    main,
    patch_losses,
    pca_rgb,
    to_uint8,
)

PANEL = 128  # 32 px images upscaled x4
PATCH = 32  # one 8 px patch of a 32 px image, upscaled x4


def assert_captioned_figure(png):
    """The figure beside the grid is readable (its title and caption: tests/test_plots.py)."""
    with Image.open(png) as im:
        assert im.width >= 800 and im.height >= 500


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    train, _ = build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=4)
    return train


def _args(ckpt_path, digits, out, count):
    return [f"model.checkpoint={ckpt_path}", "model.num_heads=4", f"data.val_folder={digits}",
            "data.img_size=32", "data.crop_ratio=1.0", f"data.count={count}",
            f"logging.folder={out}", "meta.device=cpu"]  # fmt: skip


def _panels(png, rows):
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (rows * PANEL + (rows - 1) * GAP, 2 * PANEL + GAP, 3)
    step = PANEL + GAP
    rows_ = [img[r * step : r * step + PANEL] for r in range(rows)]
    return [(row[:, :PANEL], row[:, step : step + PANEL]) for row in rows_]


def _patch_constant(panel):
    blocks = panel.reshape(4, PATCH, 4, PATCH, 3)
    return bool((blocks == blocks[:, :1, :, :1]).all())


def _shows_the_inputs(panels, digits, count):
    images = load_images(VizDataSection(val_folder=str(digits), img_size=32, crop_ratio=1.0,
                                        count=count))  # fmt: skip
    for (left, _), img in zip(panels, to_uint8(images)):
        assert np.array_equal(left[::4, ::4], img)


def test_pca_png(ckpt_path, digits, tmp_path):
    assert main(["pca", *_args(ckpt_path, digits, tmp_path, 3)]) == 0
    panels = _panels(tmp_path / "pca_grid.png", 3)  # the panels alone, pixel for pixel
    assert_captioned_figure(tmp_path / "pca.png")
    _shows_the_inputs(panels, digits, 3)
    colours = np.concatenate([right.reshape(-1, 3) for _, right in panels])
    assert len(np.unique(colours, axis=0)) >= 8 and colours.std() > 20  # not blank
    assert all(_patch_constant(right) for _, right in panels)  # one colour per patch token


def test_pca_rgb_channels_follow_the_principal_components():
    g = np.random.default_rng(0)
    a, b, c = g.normal(size=(3, 500))
    basis = np.linalg.qr(g.normal(size=(16, 3)))[0].T  # 3 orthonormal directions
    tokens = 10 * np.outer(a, basis[0]) + 4 * np.outer(b, basis[1]) + 1.5 * np.outer(c, basis[2])
    rgb = pca_rgb(tokens + 0.01 * g.normal(size=tokens.shape)).astype(float)
    for channel, source in enumerate((a, b, c)):
        assert abs(np.corrcoef(rgb[:, channel], source)[0, 1]) > 0.95


def test_losses_png(ckpt_path, digits, tmp_path):
    args = _args(ckpt_path, digits, tmp_path, 2)
    assert main(["losses", *args, "losses.maskings=48"]) == 0
    panels = _panels(tmp_path / "losses_grid.png", 2)  # the panels alone, pixel for pixel
    assert_captioned_figure(tmp_path / "losses.png")
    _shows_the_inputs(panels, digits, 2)
    for _, heat in panels:
        assert _patch_constant(heat)
        cells = heat[::PATCH, ::PATCH].reshape(-1, 3)
        assert len(np.unique(cells, axis=0)) >= 6  # a heat map, not one colour
        assert (cells.sum(1) > 0).all()  # every patch was a target at least once (no black)


def test_patch_losses_mark_targeted_patches_only(ckpt_path, context_encoder, target_encoder):
    predictor = load_predictor(ckpt_path, num_heads=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, counts = patch_losses(context_encoder, target_encoder, predictor, x,
                                LossesSection(maskings=1), seed=3)  # fmt: skip
    assert torch.equal(counts[0], counts[1])  # block masking: the same block for every image
    targeted = counts[0].flatten() > 0
    assert mean.shape == (2, 4, 4) and 0 < int(targeted.sum()) < 16
    assert torch.isnan(mean.flatten(1)[:, ~targeted]).all()
    assert (mean.flatten(1)[:, targeted] > 0).all()
    _, many = patch_losses(context_encoder, target_encoder, predictor, x,
                           LossesSection(maskings=64), seed=3)  # fmt: skip
    assert (many > 0).all()


def test_losses_without_checkpoint_is_one_error_line(digits, tmp_path, capsys):
    args = [a for a in _args("x", digits, tmp_path, 1) if not a.startswith("model.checkpoint")]
    assert main(["losses", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.checkpoint" in err


def test_multiblock_losses_average_each_patch_over_the_blocks_covering_it(
    ckpt_path, context_encoder, target_encoder
):
    from ijepa_toolkit.masks.multiblock import MaskSection, MultiBlockMaskSampler
    from ijepa_toolkit.models.vit import apply_masks, encode_masked

    predictor = load_predictor(ckpt_path, num_heads=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = LossesSection(maskings=2, masking="multiblock", target_scale=[0.15, 0.3], min_keep=2)
    mean, counts = patch_losses(context_encoder, target_encoder, predictor, x, cfg, seed=5)
    # direct: the same draws of the pretraining sampler, each (image, patch) loss listed per block
    sampler = MultiBlockMaskSampler((4, 4), MaskSection(pred_mask_scale=(0.15, 0.3), min_keep=2))
    g = torch.Generator().manual_seed(5)
    h = torch.nn.functional.layer_norm(target_encoder.forward_features(x), (64,))
    seen: dict = {}
    with torch.no_grad():
        for step in range(2):
            enc, pred = sampler.sample(2, step, g)
            z = encode_masked(context_encoder, x, enc[0])
            for tgt in pred:
                loss = torch.nn.functional.smooth_l1_loss(
                    predictor(z, enc[0], tgt), apply_masks(h, tgt), reduction="none"
                ).mean(-1)
                for i in range(2):
                    for j, patch in enumerate(tgt[i].tolist()):
                        seen.setdefault((i, patch), []).append(float(loss[i, j]))
    for i in range(2):
        for patch in range(16):
            got = float(mean[i].flatten()[patch])
            if (i, patch) in seen:
                assert got == pytest.approx(np.mean(seen[i, patch]), rel=1e-5)
                assert counts[i].flatten()[patch] == len(seen[i, patch])
            else:
                assert math.isnan(got) and counts[i].flatten()[patch] == 0
    assert counts.max() > 1  # overlapping target blocks were averaged somewhere
    from ijepa_toolkit.config import ConfigError, load_config
    from ijepa_toolkit.viz import VizConfig

    with pytest.raises(ConfigError, match=r"losses.masking.*one of \['block', 'multiblock'\]"):
        load_config(VizConfig, None, ["losses.masking=x"])
