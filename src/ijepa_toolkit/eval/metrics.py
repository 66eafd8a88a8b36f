"""Metrics shared by the frozen-feature protocols (one place, so protocols never import each
other)."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from timm.utils import accuracy

Top1Rule = Literal["topk", "argmax"]


def topk_hits(
    scores: torch.Tensor,
    labels: torch.Tensor,
    topk: Sequence[int] = (1, 5),
    top1: Top1Rule = "topk",
) -> dict:
    """``{k: number of rows of (N, C) scores whose (N,) label is among the k highest}``.

    ``timm.utils.accuracy`` ranks (ties as ``torch.topk``); it returns float32 percents, from
    which the integer counts are recovered exactly (N below 2**24 / 100). ``top1="argmax"``:
    top-1 is ``scores.argmax(1)``, the first of exactly tied maxima, as DINOv2's metric
    (torchmetrics ``MulticlassAccuracy(top_k=1)`` takes ``preds.argmax(dim=1)``)."""
    labels = labels.to(scores.device).long()
    percents = accuracy(scores, labels, topk=tuple(topk))
    hits = {k: round(float(p) * len(labels) / 100.0) for k, p in zip(topk, percents)}
    if top1 == "argmax" and 1 in hits:
        hits[1] = int((scores.argmax(dim=1) == labels).sum())
    return hits


def topk_accuracy(
    scores: torch.Tensor,
    labels: torch.Tensor,
    topk: Sequence[int] = (1, 5),
    top1: Top1Rule = "topk",
) -> dict:
    """``{k: percent of rows whose label is among the k highest scores}`` (float64 percents of
    exact counts, see ``topk_hits``)."""
    hits = topk_hits(scores, labels, topk, top1)
    return {k: 100.0 * n / len(labels) for k, n in hits.items()}
