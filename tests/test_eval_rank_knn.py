"""RankMe / LiDAR and weighted kNN against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ijepa_toolkit.eval.knn import knn_features, knn_scores, top_k
from ijepa_toolkit.eval.metrics import topk_accuracy
from ijepa_toolkit.eval.rank import lidar, rankme


def test_rankme_counts_effective_dimensions():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16))[0]
    coords = torch.zeros(200, 16)
    coords[:, :4] = torch.randn(200, 4)
    low = coords @ basis.T  # rank 4
    assert rankme(low) == pytest.approx(4.0, abs=0.3)
    assert rankme(torch.randn(2000, 16)) > 15.0
    s = np.linalg.svd(low.double().numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(low) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_lidar_matches_numpy_lda_and_rewards_separable_classes():
    torch.manual_seed(0)
    centres = torch.randn(50, 1, 8) * 3
    views = centres + 0.1 * torch.randn(50, 4, 8)
    z = views.double().numpy()
    n, q, d = z.shape
    mu = z.mean(1)
    sb = np.cov(mu.T, bias=False)
    dev = (z - mu[:, None]).reshape(-1, d)
    sw = dev.T @ dev / (n * (q - 1)) + 1e-4 * np.eye(d)
    w, v = np.linalg.eigh(sw)
    inv = v @ np.diag(w**-0.5) @ v.T
    lam = np.clip(np.linalg.eigvalsh(inv @ sb @ inv), 0, None)
    p = lam / lam.sum() + 1e-8
    assert lidar(views) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    collapsed = centres.expand(-1, 4, -1).clone()
    collapsed[..., 4:] = 0.1 * torch.randn(50, 4, 4)  # only 4 informative dims
    assert lidar(collapsed) < lidar(views)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 12)), rng.normal(size=(40, 12))
    labels = rng.integers(0, 5, size=300)
    got = knn_scores(torch.tensor(train), torch.tensor(labels), torch.tensor(test), 5,
                     ks=(1, 10, 20), temperature=0.07, chunk_size=7)  # fmt: skip
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    sn = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = sn @ tn.T
    for k in (1, 10, 20):
        order = np.argsort(-sims, axis=1)[:, :k]
        ref = np.zeros((40, 5))
        for i in range(40):
            for j in order[i]:
                ref[i, labels[j]] += np.exp(sims[i, j] / 0.07)
        assert (got[k].argmax(1).numpy() == ref.argmax(1)).all()
        scaled = ref * np.exp(-1 / 0.07)
        np.testing.assert_allclose(got[k].numpy(), scaled, rtol=1e-4)


@pytest.mark.parametrize("n", [16 * 4 * 50, 16 * 4 * 50 + 7])
def test_pruned_top_k_is_exact(n):
    torch.manual_seed(0)
    sims = torch.randn(32, n)
    sims[3, -2] = 50.0  # a winner in the ragged tail (or the last group)
    sims[5] = sims[5].sort().values  # sorted rows: all winners in the last columns
    values, idx = top_k(sims, 50)
    ref = sims.topk(50, dim=1).values
    torch.testing.assert_close(values.sort(dim=1, descending=True).values, ref, rtol=0, atol=0)
    torch.testing.assert_close(sims.gather(1, idx), values, rtol=0, atol=0)
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct columns


def test_knn_features_top1_top5_match_votes_by_hand():
    g = torch.Generator().manual_seed(0)
    x_tr, x_te = torch.randn(300, 8, generator=g), torch.randn(90, 8, generator=g)
    y_tr, y_te = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (90,), generator=g)
    metrics = knn_features(x_tr, y_tr, x_te, y_te, ks=(3, 20), temperature=0.1)
    sims = F.normalize(x_te, dim=1).double() @ F.normalize(x_tr, dim=1).double().T
    for k in (3, 20):
        top = sims.topk(k, dim=1)
        votes = torch.zeros(90, 7, dtype=torch.float64).scatter_add_(
            1, y_tr[top.indices], torch.exp(top.values / 0.1)
        )
        ranked = votes.argsort(dim=1, descending=True)
        top5 = (ranked[:, :5] == y_te[:, None]).any(dim=1).double().mean() * 100
        assert metrics[f"top1@k{k}"] == pytest.approx(
            float((ranked[:, 0] == y_te).double().mean() * 100)
        )
        if k == 20:  # at k=3 most classes have no vote: their order in the top 5 is a tie
            assert metrics[f"top5@k{k}"] == pytest.approx(float(top5))


def test_topk_accuracy_is_exact_percent_of_counts_with_ties_as_topk():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (997, 6), generator=g).float()  # many ties
    labels = torch.randint(0, 6, (997,), generator=g)
    ranked = scores.topk(5, dim=1).indices  # the tie order every top-k in the toolkit uses
    acc = topk_accuracy(scores, labels, (1, 2, 5))
    for k in (1, 2, 5):
        hits = int((ranked[:, :k] == labels[:, None]).any(dim=1).sum())
        assert acc[k] == 100.0 * hits / 997  # exact, float64
