"""kNN against a reference written from DINOv2
(facebookresearch/dinov2@b8931f7bf91576930313be2c6d6af376033b35f0): ``dinov2/eval/knn.py``
(``KnnModule.forward``: softmax of the top-k similarities / T, one-hot votes summed over the
first k) and ``dinov2/eval/metrics.py`` (torchmetrics ``MulticlassAccuracy(top_k=1)``, which
takes ``preds.argmax(dim=1)``)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from ijepa_toolkit.eval.knn import effective_ks, knn_features


def dinov2_top1(train, train_labels, test, test_labels, k, T=0.07, num_classes=10) -> float:
    sims = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top_sims, idx = sims.topk(k, largest=True, sorted=True)
    weights = torch.softmax(top_sims / T, dim=1)
    votes = F.one_hot(train_labels[idx], num_classes) * weights[:, :, None]
    preds = votes.sum(dim=1).argmax(dim=1)
    return 100.0 * float((preds == test_labels).double().mean())


def tied_bank(n_pairs: int = 300, n_test: int = 400, num_classes: int = 10):
    """Every training vector twice, with two different labels: with k even, the top-k holds
    whole pairs and the two classes of a pair get exactly the same vote."""
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(n_pairs, 16, generator=g)
    a = torch.randint(0, num_classes, (n_pairs,), generator=g)
    b = (a + torch.randint(1, num_classes, (n_pairs,), generator=g)) % num_classes
    train, labels = torch.cat([vecs, vecs]), torch.cat([a, b])
    test = torch.randn(n_test, 16, generator=g)
    nearest = (F.normalize(test, dim=1) @ F.normalize(vecs, dim=1).T).argmax(1)
    pick = torch.randint(0, 2, (n_test,), generator=g).bool()
    test_labels = torch.where(pick, a[nearest], b[nearest])  # one of the tied classes
    return train, labels, test, test_labels


def test_tied_class_scores_resolve_as_dinov2_argmax():
    train, labels, test, test_labels = tied_bank()
    metrics = knn_features(train, labels, test, test_labels, ks=[2, 10], num_classes=10)
    for k in (2, 10):
        assert metrics[f"top1@k{k}"] == pytest.approx(
            dinov2_top1(train, labels, test, test_labels, k)
        )
    # k=2 ties every row; the rule matters: argmax (first) is not the same as topk's first
    assert metrics["top1@k2"] == pytest.approx(100.0 * float(
        (torch.minimum(labels[:300], labels[300:])[(F.normalize(test, dim=1) @ F.normalize(
            train[:300], dim=1).T).argmax(1)] == test_labels).double().mean()))  # fmt: skip


def test_k_above_the_bank_records_the_effective_k(caplog):
    train, labels, test, test_labels = tied_bank(n_pairs=40, n_test=50)
    train, labels = train[:75], labels[:75]
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        used, warnings = effective_ks([10, 200], len(labels))
    assert used == {"10": 10, "200": 75} and "k=200" in warnings[0] and "75" in caplog.text
    asked = knn_features(train, labels, test, test_labels, ks=[200], num_classes=10)
    exact = knn_features(train, labels, test, test_labels, ks=[75], num_classes=10)
    assert asked["top1@k200"] == exact["top1@k75"] and asked["top5@k200"] == exact["top5@k75"]
