"""Weighted kNN classification on frozen features (the DINOv2 protocol).

Features are L2-normalised; similarity is cosine; each of the top-k neighbours votes for its
class with weight ``exp(sim / T)``. The test set is processed in chunks so memory stays bounded
at ``chunk_size x N_train`` similarities.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Class scores (N_test, C) for each k: sum of ``exp(sim/T)`` over the top-k neighbours.

    ``train_feats`` (N_train, D), ``train_labels`` (N_train,) ints, ``test_feats`` (N_test, D).
    Ties in similarity are broken by ``torch.topk``. k larger than N_train is clipped.
    """
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    max_k = min(max(ks), train.shape[0])
    out = {k: [] for k in ks}
    for start in range(0, test_feats.shape[0], chunk_size):
        test = F.normalize(test_feats[start : start + chunk_size].float().to(train.device), dim=1)
        sims, idx = (test @ train.T).topk(max_k, dim=1, largest=True, sorted=True)
        weights = torch.exp((sims - 1.0) / temperature)  # exp(sim/T) up to a constant factor
        votes = F.one_hot(labels[idx], num_classes).to(weights.dtype) * weights.unsqueeze(-1)
        cumulative = votes.cumsum(dim=1)  # (chunk, max_k, C)
        for k in ks:
            out[k].append(cumulative[:, min(k, max_k) - 1])
    return {k: torch.cat(v) for k, v in out.items()}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict:
    """Percent of rows whose label is among the ``k`` highest scores, for each k in ``topk``."""
    labels = labels.to(scores.device).long()
    ranked = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: 100.0 * float(hits[:, :k].any(dim=1).float().mean()) for k in topk}
