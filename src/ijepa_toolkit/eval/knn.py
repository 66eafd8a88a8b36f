"""Weighted kNN classification on frozen features (the DINOv2 protocol).

Features are L2-normalised; similarity is cosine; each of the top-k neighbours votes for its
class with weight ``exp(sim / T)``. The test set is processed in chunks so memory stays bounded
at ``chunk_size x N_train`` similarities. Under torch.distributed each rank may hold a slice of
the training bank (``sharded=True``): ranks exchange only their top-k candidates per test row.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
PRUNE_BLOCK = 16


def top_k(
    sims: torch.Tensor, k: int, block: int = PRUNE_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the ``k`` largest entries of each row of (R, N) ``sims``, unsorted.

    Exact, and cheaper than one ``topk`` over N for N >= 4 * block * k: the columns are split
    into ``N // block`` strided groups; only the ``k`` groups with the largest maxima can hold a
    top-k entry (each group whose max reaches the k-th largest value holds one of the k largest),
    so the final ``topk`` runs over ``block * k`` candidates (+ the ragged tail).
    """
    rows, n = sims.shape
    groups = n // block
    if groups < 4 * k:
        return sims.topk(k, dim=1, sorted=False)
    grid = sims[:, : groups * block].view(rows, block, groups)  # group g: columns g + i * groups
    best = grid.amax(dim=1).topk(k, dim=1, sorted=False).indices  # (R, k)
    cand = grid.gather(2, best.unsqueeze(1).expand(-1, block, -1)).view(rows, block * k)
    tail = n - groups * block
    if tail:
        cand = torch.cat([cand, sims[:, groups * block :]], dim=1)
    values, pos = cand.topk(k, dim=1, sorted=False)
    in_grid = pos < block * k
    grid_pos = pos.clamp(max=block * k - 1)
    cols = best.gather(1, grid_pos % k) + (grid_pos // k) * groups
    return values, torch.where(in_grid, cols, pos - block * k + groups * block)


def _gather_candidates(sims: torch.Tensor, labels: torch.Tensor, max_k: int):
    """Top ``max_k`` of the (chunk, k_local) candidates of all ranks, (chunk, max_k) each."""
    world = dist.get_world_size()
    pad = max_k - sims.shape[1]
    if pad:  # a rank with fewer than max_k bank rows pads with weightless candidates
        sims = F.pad(sims, (0, pad), value=-float("inf"))
        labels = F.pad(labels, (0, pad), value=0)
    all_sims = [torch.empty_like(sims) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_sims, sims.contiguous())
    dist.all_gather(all_labels, labels.contiguous())
    sims, pos = torch.cat(all_sims, dim=1).topk(max_k, dim=1, sorted=True)
    return sims, torch.cat(all_labels, dim=1).gather(1, pos)


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    sharded: bool = False,
) -> dict[int, torch.Tensor]:
    """Class scores (N_test, C) for each k: sum of ``exp(sim/T)`` over the top-k neighbours.

    ``train_feats`` (N_train, D), ``train_labels`` (N_train,) ints, ``test_feats`` (N_test, D).
    Scores are scaled by ``exp(-1/T)`` (same ranking, no overflow). Ties in similarity are broken
    by ``torch.topk``. k larger than N_train is clipped. ``sharded=True`` (every rank calls it
    with its own bank slice and the same test features) gives every rank the scores of the
    whole bank.
    """
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    n_train = train.shape[0]
    if sharded and dist.is_available() and dist.is_initialized():
        total = torch.tensor([n_train], device=train.device)
        dist.all_reduce(total)
        n_total = int(total)
    else:
        sharded, n_total = False, n_train
    ks = sorted(set(ks))
    max_k = min(ks[-1], n_total)
    out = {k: [] for k in ks}
    buffer = None  # one (chunk, N_train) similarity block, reused: no page faults per chunk
    for start in range(0, test_feats.shape[0], chunk_size):
        test = F.normalize(test_feats[start : start + chunk_size].float().to(train.device), dim=1)
        if buffer is None or buffer.shape[0] != test.shape[0]:
            buffer = torch.empty(test.shape[0], n_train, device=train.device)
        sims, idx = top_k(torch.mm(test, train.T, out=buffer), min(max_k, n_train))
        sims, order = sims.sort(dim=1, descending=True)  # sorting k << N_train values is cheap
        neighbour_labels = labels[idx.gather(1, order)]
        if sharded:
            sims, neighbour_labels = _gather_candidates(sims, neighbour_labels, max_k)
        weights = torch.exp((sims - 1.0) / temperature)  # exp(sim/T) up to a constant factor
        scores = torch.zeros(test.shape[0], num_classes, dtype=weights.dtype, device=test.device)
        done = 0
        for k in ks:  # add the neighbours done..k to the running sums
            k_eff = min(k, max_k)
            scores.scatter_add_(1, neighbour_labels[:, done:k_eff], weights[:, done:k_eff])
            done = k_eff
            out[k].append(scores.clone())
    return {k: torch.cat(v) for k, v in out.items()}


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict:
    """Number of rows of (N, C) ``scores`` whose label is among the ``k`` highest, for each k."""
    labels = labels.to(scores.device).long()
    ranked = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in topk}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict:
    """Percent of rows whose label is among the ``k`` highest scores, for each k in ``topk``."""
    hits = topk_hits(scores, labels, topk)
    return {k: 100.0 * hits[k] / len(labels) for k in topk}
