"""Monocular depth metrics (BTS / AdaBins / DINOv2 definitions), computed per image, then averaged.

Every choice that makes published numbers disagree is an argument here: the evaluation crop, the
valid-depth range, and the averaging (per image, then the mean over images). An image with no
valid pixel is skipped with a warning and counted, never turned into a NaN in the averages.
Predictions go through ``bts_prediction`` first: BTS's clamp to the evaluation range and its
NaN / inf replacement (the non-finite pixels are counted, so a NaN never reaches a metric).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

logger = logging.getLogger("ijepa_toolkit")

METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
EIGEN_SIZE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)  # rows [45:471], cols [41:601] of a 480x640 NYU frame
CROPS = ("eigen", "none")

Box = tuple[int, int, int, int]


def crop_box(kind: str, height: int, width: int) -> Optional[Box]:
    """``(top, bottom, left, right)`` of the evaluation crop for an ``height x width`` map.

    ``eigen``: ``[45:471, 41:601]`` on 480x640 (Eigen et al. 2014); other sizes get the same
    fractions of the frame, rounded half up. ``none``: no crop (``None``).
    """
    if kind == "none":
        return None
    if kind != "eigen":
        raise ValueError(f"eval crop must be one of {CROPS}, got {kind!r}")
    if (height, width) == EIGEN_SIZE:
        return EIGEN_CROP
    t, b, left, r = EIGEN_CROP
    h0, w0 = EIGEN_SIZE
    return (
        _round(t * height / h0), _round(b * height / h0),
        _round(left * width / w0), _round(r * width / w0),
    )  # fmt: skip


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def valid_mask(
    gt: torch.Tensor, min_depth: float, max_depth: float, crop: Optional[Box] = None
) -> torch.Tensor:
    """(H, W) bool: ``min_depth < gt < max_depth`` (metres) and inside ``crop`` if given."""
    mask = (gt > min_depth) & (gt < max_depth)
    if crop is not None:
        t, b, left, r = crop
        inside = torch.zeros_like(mask)
        inside[t:b, left:r] = True
        mask &= inside
    return mask


def bts_prediction(
    pred: torch.Tensor, min_depth: float, max_depth: float, clamp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """BTS's prediction clean-up before the metrics (``pytorch/bts_eval.py`` of cleinc/bts):
    ``clamp`` to ``[min_depth, max_depth]`` (so -inf becomes ``min_depth``, +inf ``max_depth``),
    then any remaining inf becomes ``max_depth`` and NaN becomes ``min_depth``.

    ``pred``: depth in metres, any shape. Returns the new prediction (a copy) and the bool map of
    the pixels that were not finite."""
    bad = ~torch.isfinite(pred)
    out = pred.clamp(min_depth, max_depth) if clamp else pred.clone()
    out[torch.isinf(out)] = max_depth
    out[torch.isnan(out)] = min_depth
    return out, bad


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The standard metrics of one image over the pixels where ``mask`` is true.

    ``pred``, ``gt``: (H, W) depth in metres, positive on the mask. ``d1..d3``: fraction of pixels
    with ``max(gt/pred, pred/gt) < 1.25**k``; ``rmse``, ``rmse_log`` (natural log), ``abs_rel``,
    ``sq_rel``, ``log10`` (mean absolute log10 error); ``silog`` = 100 * sqrt(mean(e^2) -
    mean(e)^2) with ``e = log(pred) - log(gt)`` (BTS convention). Computed in float64.
    """
    p = pred[mask].double()
    g = gt[mask].double()
    if p.numel() == 0:
        raise ValueError("depth_metrics: the mask selects no pixel")
    ratio = torch.maximum(g / p, p / g)
    err_log = torch.log(p) - torch.log(g)
    diff = g - p
    silog_var = (err_log.pow(2).mean() - err_log.mean().pow(2)).clamp_min(0)
    out = {
        "d1": (ratio < 1.25).double().mean(),
        "d2": (ratio < 1.25**2).double().mean(),
        "d3": (ratio < 1.25**3).double().mean(),
        "abs_rel": (diff.abs() / g).mean(),
        "sq_rel": (diff.pow(2) / g).mean(),
        "rmse": diff.pow(2).mean().sqrt(),
        "rmse_log": err_log.pow(2).mean().sqrt(),
        "log10": (torch.log10(p) - torch.log10(g)).abs().mean(),
        "silog": 100.0 * silog_var.sqrt(),
    }
    return {k: float(v) for k, v in out.items()}


class DepthMetricMeter:
    """Accumulates per-image metrics; ``average()`` is the mean over the images that counted.

    Images whose mask is empty (no valid ground truth) are skipped with a warning naming them and
    counted in ``skipped``. ``nonfinite_pixels`` / ``nonfinite_images``: prediction pixels on the
    mask that were NaN or inf before ``bts_prediction`` (``nonfinite`` of ``update``).
    """

    def __init__(self) -> None:
        self.sums = dict.fromkeys(METRICS, 0.0)
        self.count = 0
        self.skipped: list[str] = []
        self.nonfinite_pixels = 0
        self.nonfinite_images = 0

    def update(
        self,
        pred: torch.Tensor,
        gt: torch.Tensor,
        mask: torch.Tensor,
        name: str = "?",
        nonfinite: Optional[torch.Tensor] = None,
    ) -> Optional[dict[str, float]]:
        """Add one image; returns its metrics, or ``None`` when it was skipped. ``nonfinite``:
        the (H, W) bool map of ``bts_prediction``, counted on the mask and logged."""
        if not bool(mask.any()):
            logger.warning("skipping %s: no valid ground-truth depth pixel in the range/crop", name)
            self.skipped.append(name)
            return None
        bad = int((nonfinite & mask).sum()) if nonfinite is not None else 0
        if bad:
            logger.warning("%s: %d predicted depths were NaN/inf (set as BTS does)", name, bad)
            self.nonfinite_pixels += bad
            self.nonfinite_images += 1
        values = depth_metrics(pred, gt, mask)
        for k, v in values.items():
            self.sums[k] += v
        self.count += 1
        return values

    def average(self) -> dict[str, float]:
        """Mean of each metric over the counted images (NaN only if no image counted)."""
        if self.count == 0:
            return dict.fromkeys(METRICS, math.nan)
        return {k: v / self.count for k, v in self.sums.items()}
