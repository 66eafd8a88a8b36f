"""Depth metrics, valid mask, Eigen crop and per-image averaging against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ijepa_toolkit.eval.depth_metrics import (
    DepthMetricMeter,
    crop_box,
    depth_metrics,
    valid_mask,
)

GT = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
PRED = torch.tensor([[1.0, 2.4], [5.2, 7.0]])


def test_each_metric_by_hand():
    mask = valid_mask(GT, 1e-3, 10.0)
    assert mask.tolist() == [[True, True], [True, False]]
    m = depth_metrics(PRED, GT, mask)
    # valid pixels: (gt, pred) = (1, 1), (2, 2.4), (4, 5.2); ratios 1, 1.2, 1.3
    e = [0.0, math.log(1.2), math.log(1.3)]
    expected = {
        "d1": 2 / 3,
        "d2": 1.0,
        "d3": 1.0,
        "abs_rel": (0 + 0.4 / 2 + 1.2 / 4) / 3,
        "sq_rel": (0 + 0.16 / 2 + 1.44 / 4) / 3,
        "rmse": math.sqrt((0 + 0.16 + 1.44) / 3),
        "rmse_log": math.sqrt(sum(x * x for x in e) / 3),
        "log10": (0 + math.log10(1.2) + math.log10(1.3)) / 3,
        "silog": 100 * math.sqrt(sum(x * x for x in e) / 3 - (sum(e) / 3) ** 2),
    }
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-6), k  # inputs are float32


def test_thresholds_are_strict_and_symmetric():
    gt = torch.tensor([[2.0, 2.0, 2.0]])
    pred = torch.tensor([[2.0 * 1.25**2 * 1.01, 2.0 / 1.3, 2.0 * 1.1]])  # ratios 1.578, 1.3, 1.1
    m = depth_metrics(pred, gt, torch.ones_like(gt, dtype=torch.bool))
    assert (m["d1"], m["d2"], m["d3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))


def test_valid_mask_range_is_open_at_both_ends():
    gt = torch.tensor([[0.0, 1e-3, 0.5, 9.99, 10.0, 25.0]])
    assert valid_mask(gt, 1e-3, 10.0).tolist() == [[False, False, True, True, False, False]]
    assert valid_mask(gt, 0.4, 30.0).tolist() == [[False, False, True, True, True, True]]


def test_eigen_crop_on_nyu_size_and_scaled():
    assert crop_box("eigen", 480, 640) == (45, 471, 41, 601)
    assert crop_box("none", 480, 640) is None
    # 48x64: 4.5 -> 5, 47.1 -> 47, 4.1 -> 4, 60.1 -> 60
    assert crop_box("eigen", 48, 64) == (5, 47, 4, 60)
    mask = valid_mask(torch.full((480, 640), 3.0), 1e-3, 10.0, crop_box("eigen", 480, 640))
    assert int(mask.sum()) == (471 - 45) * (601 - 41)
    assert bool(mask[45, 41]) and not bool(mask[44, 41]) and not bool(mask[45, 601])
    with pytest.raises(ValueError, match="garg"):
        crop_box("garg", 480, 640)


def test_crop_excludes_the_border_errors():
    gt = torch.full((480, 640), 2.0)
    pred = gt.clone()
    pred[:45] = 8.0  # wrong only above the crop
    inside = valid_mask(gt, 1e-3, 10.0, crop_box("eigen", 480, 640))
    everywhere = valid_mask(gt, 1e-3, 10.0)
    assert depth_metrics(pred, gt, inside)["rmse"] == 0.0
    assert depth_metrics(pred, gt, everywhere)["rmse"] == pytest.approx(
        math.sqrt(36 * 45 / 480), rel=1e-9
    )


def test_meter_averages_per_image_and_skips_all_invalid(caplog):
    meter = DepthMetricMeter()
    one = torch.ones(1, 1, dtype=torch.bool)
    meter.update(torch.tensor([[3.0]]), torch.tensor([[1.0]]), one, "a")  # rmse 2
    big = torch.ones(1, 3, dtype=torch.bool)
    meter.update(torch.full((1, 3), 2.0), torch.full((1, 3), 2.0), big, "b")  # rmse 0
    with caplog.at_level("WARNING", logger="ijepa_toolkit"):
        out = meter.update(torch.ones(2, 2), torch.zeros(2, 2), torch.zeros(2, 2).bool(), "empty")
    assert out is None and meter.skipped == ["empty"] and "empty" in caplog.text
    avg = meter.average()
    assert meter.count == 2
    assert avg["rmse"] == pytest.approx((2 + 0) / 2)  # per image; pixel-pooled would be 1.0
    assert all(math.isfinite(v) for v in avg.values())
