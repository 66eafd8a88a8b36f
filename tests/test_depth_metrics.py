"""Depth metrics, valid mask, Eigen crop and per-image averaging against values worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ijepa_toolkit.eval.depth_metrics import (
    METRICS,
    DepthMetricMeter,
    bts_prediction,
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


def bts_reference(gt: np.ndarray, pred: np.ndarray, min_depth: float, max_depth: float) -> dict:
    """BTS's evaluation of one image, written from cleinc/bts ``pytorch/bts_eval.py`` at commit
    5e3406b35d1497b2e55d2dd600524d1f4efacaed (``eval`` and ``compute_errors``): the prediction
    is clamped to [min_depth_eval, max_depth_eval], then inf -> max_depth_eval and NaN ->
    min_depth_eval; valid pixels ``min_depth_eval < gt < max_depth_eval``."""
    pred = pred.astype(np.float64).copy()
    pred[pred < min_depth] = min_depth
    pred[pred > max_depth] = max_depth
    pred[np.isinf(pred)] = max_depth
    pred[np.isnan(pred)] = min_depth
    valid = np.logical_and(gt > min_depth, gt < max_depth)
    g, p = gt[valid].astype(np.float64), pred[valid]
    thresh = np.maximum(g / p, p / g)
    err = np.log(p) - np.log(g)
    return {
        "d1": (thresh < 1.25).mean(), "d2": (thresh < 1.25**2).mean(),
        "d3": (thresh < 1.25**3).mean(),
        "abs_rel": np.mean(np.abs(g - p) / g), "sq_rel": np.mean((g - p) ** 2 / g),
        "rmse": np.sqrt(((g - p) ** 2).mean()), "rmse_log": np.sqrt((err**2).mean()),
        "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
        "silog": np.sqrt(np.mean(err**2) - np.mean(err) ** 2) * 100,
    }  # fmt: skip


class FixedProbe(torch.nn.Module):
    """Stands in for the depth probe: returns the given (1, 1, H, W) predictions in turn."""

    def __init__(self, preds: list[torch.Tensor]):
        super().__init__()
        self.preds = iter(preds)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return next(self.preds)


def test_nan_and_inf_predictions_follow_bts_and_are_counted():
    """Before: one NaN pixel made that image's metrics and the dataset mean NaN."""
    from ijepa_toolkit.eval.depth import DepthConfig, evaluate

    gen = torch.Generator().manual_seed(0)
    gts = [torch.rand(1, 1, 12, 16, generator=gen) * 9 + 0.5 for _ in range(2)]
    preds = [g * (1 + 0.3 * torch.randn(g.shape, generator=gen)) for g in gts]
    preds[0][0, 0, 2, 3], preds[0][0, 0, 5, 5], preds[0][0, 0, 7, 1] = math.nan, math.inf, -math.inf
    preds[1][0, 0, 0, :4] = math.nan
    cfg = DepthConfig()
    cfg.eval.crop = "none"
    lo, hi = cfg.data.min_depth, cfg.data.max_depth
    batches = [{"image": torch.zeros(1, 3, 12, 16), "depth": g, "name": [f"img{i}"]}
               for i, g in enumerate(gts)]  # fmt: skip
    meter = evaluate(FixedProbe([p.clone() for p in preds]), batches, cfg, torch.device("cpu"))
    refs = [bts_reference(g[0, 0].numpy(), p[0, 0].numpy(), lo, hi) for g, p in zip(gts, preds)]
    got = meter.average()
    for k in METRICS:
        assert got[k] == pytest.approx((refs[0][k] + refs[1][k]) / 2, rel=1e-6, abs=1e-9), k
    assert (meter.nonfinite_pixels, meter.nonfinite_images) == (7, 2)


def test_bts_prediction_without_clamp_still_replaces_nan_and_inf():
    pred = torch.tensor([math.nan, math.inf, -math.inf, 20.0, 1e-6], dtype=torch.float64)
    out, bad = bts_prediction(pred, 1e-3, 10.0, clamp=False)
    assert out.tolist() == [1e-3, 10.0, 10.0, 20.0, 1e-6]  # BTS's isinf line: both signs -> max
    assert bad.tolist() == [True, True, True, False, False]
    out, _ = bts_prediction(pred, 1e-3, 10.0)
    assert out.tolist() == pytest.approx([1e-3, 10.0, 1e-3, 10.0, 1e-3])
