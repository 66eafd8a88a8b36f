"""Weighted kNN classification on frozen features (the DINOv2 protocol).

    python -m ijepa_toolkit.eval.knn --fname knn/digits [section.key=value ...]   # or ijepa-knn
    torchrun --nproc_per_node 2 -m ijepa_toolkit.eval.knn --fname ...   # bank sharded across ranks

From Python: ``knn(encoder, train_folder, val_folder)`` (an encoder object) or
``knn_features(train_feats, train_labels, test_feats, test_labels)`` (features you have).

Features are L2-normalised; similarity is cosine; each of the top-k neighbours votes for its
class with weight ``exp(sim / T)`` (DINOv2 facebookresearch/dinov2@b8931f7 ``dinov2/eval/knn.py``
normalises these weights by a softmax over the neighbours: the same ranking). Top-1 is the
``argmax`` of the class scores, the first class among exact ties, as DINOv2's torchmetrics metric;
top-5 ranks as ``torch.topk``. A k above the number of training images uses them all: the
requested k stays in the metric key, ``effective_k`` is in the settings, with a warning.

The test set is processed in chunks so memory stays bounded at ``chunk_size x N_train``
similarities. Under torch.distributed each rank may hold a slice of
the training bank (``sharded=True``): ranks exchange only their top-k candidates per test row.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ..config import EncoderSection, LoggingSection, MetaSection
from ..engine.utils import progress
from .features import EvalDataSection, FeaturesSection
from .frozen import (
    cache_settings,
    check_same_classes,
    encode_folders,
    finish_run,
    protocol_main,
    split_features,
    start_run,
)

if TYPE_CHECKING:  # torch is imported when a run starts, not with the module (--help)
    import torch

logger = logging.getLogger("ijepa_toolkit")
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
    import torch

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
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

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
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

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
    starts = range(0, test_feats.shape[0], chunk_size)
    for start in progress(starts, "knn", test_feats.shape[0], unit="img",
                          size=lambda s: min(chunk_size, test_feats.shape[0] - s)):  # fmt: skip
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


def knn_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    chunk_size: int = 1024,
    sharded: bool = False,
) -> dict[str, float]:
    """``{"top1@k<k>": %, "top5@k<k>": %}`` of the weighted kNN classifier for each k in ``ks``.

    (N_train, D) / (N_train,) training features and labels, (N_test, D) / (N_test,) test ones
    (tensors or arrays). ``num_classes`` defaults to the largest label + 1 (give it when
    ``sharded``: every rank passes its own slice of the training bank, see ``knn_scores``).
    """
    import torch

    from .metrics import topk_accuracy

    train_feats, train_labels, test_feats, test_labels = (
        torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
        for x in (train_feats, train_labels, test_feats, test_labels)
    )
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, ks, temperature,
                        chunk_size, sharded)  # fmt: skip
    metrics = {}
    for k, s in scores.items():
        acc = topk_accuracy(s, test_labels, (1, 5), top1="argmax")
        metrics[f"top1@k{k}"], metrics[f"top5@k{k}"] = acc[1], acc[5]
    return metrics


def effective_ks(ks: Sequence[int], n_train: int) -> tuple[dict[str, int], list[str]]:
    """(``{"<k>": k used}``, warnings): each k above ``n_train`` training images uses them all."""
    used = {str(k): min(k, n_train) for k in sorted(set(ks))}
    warnings = [
        f"knn.ks: k={k} but only {n_train} training images; top1@k{k}/top5@k{k} use k={n_train}"
        for k, e in used.items() if e < int(k)
    ]  # fmt: skip
    for w in warnings:
        logger.warning(w)
    return used, warnings


def knn(
    encoder: torch.nn.Module,
    train_folder: str,
    val_folder: str,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    layers: str = "last",
    **data_options: Any,
) -> dict[str, float]:
    """Weighted kNN top-1/top-5 (%) of ``encoder``'s features of two image folders (no cache).

    ``data_options`` are ``EvalDataSection`` fields (``img_size``, ``crop_ratio``, ``mean``,
    ``std``, ``batch_size``, ``num_workers``): the evaluation transform; the encoder runs on
    the device it is on.
    """
    train, test = encode_folders(encoder, train_folder, val_folder, layers, data_options)
    effective_ks(ks, len(train.labels))
    return knn_features(train.feats, train.labels, test.feats, test.labels, ks, temperature,
                        num_classes=len(train.classes))  # fmt: skip


@dataclass
class KNNSection:
    ks: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_KS))  # neighbours
    temperature: float = 0.07  # T of the exp(sim / T) vote weights
    chunk_size: int = 1024  # test rows per similarity block: memory chunk_size x N_train/rank

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        return [
            ("ks", self.ks, bool(self.ks) and min(self.ks) >= 1, "a non-empty list of ints >= 1"),
            ("temperature", self.temperature, self.temperature > 0, "> 0"),
            ("chunk_size", self.chunk_size, self.chunk_size >= 1, ">= 1"),
        ]


@dataclass
class KNNConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: EvalDataSection = dataclasses.field(default_factory=EvalDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    knn: KNNSection = dataclasses.field(default_factory=KNNSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def run(cfg: KNNConfig) -> dict[str, float]:
    """The kNN protocol of ``cfg`` on cached features; writes the run folder, returns metrics.

    Under torchrun each rank holds a strided slice of the training bank."""
    settings = {
        "normalize": "l2", "similarity": "cosine", "weights": "exp(sim/T)",
        "temperature": cfg.knn.temperature, "ks": cfg.knn.ks, "layers": cfg.features.layers,
        "transform": f"resize {round(cfg.data.img_size / cfg.data.crop_ratio)} "
        f"{cfg.data.interpolation}, "
        f"center crop {cfg.data.img_size}, mean {cfg.data.mean}, std {cfg.data.std}",
    }  # fmt: skip
    dist_info = start_run(cfg, "knn", settings)  # (the cheap checks: before torch is imported)
    import torch

    train = split_features(cfg, cfg.data.train_folder, dist_info)
    test = split_features(cfg, cfg.data.val_folder, dist_info)
    check_same_classes(train, test)
    shard = slice(dist_info.rank, None, dist_info.world_size)  # this rank's part of the bank
    metrics = knn_features(
        torch.from_numpy(np.array(train.feats[shard])).to(dist_info.device),
        torch.from_numpy(np.array(train.labels[shard])).to(dist_info.device),
        torch.from_numpy(np.array(test.feats)), torch.from_numpy(test.labels), cfg.knn.ks,
        cfg.knn.temperature, len(train.classes), cfg.knn.chunk_size, sharded=True,
    )  # fmt: skip
    used, warnings = effective_ks(cfg.knn.ks, len(train.labels))
    settings.update(effective_k=used, warnings=warnings, top1_rule="argmax (DINOv2)")
    settings.update(n_train=len(train.labels), n_test=len(test.labels),
                    world_size=dist_info.world_size,
                    **cache_settings(("train", train), ("test", test)))  # fmt: skip
    finish_run(cfg, dist_info, "knn", metrics, settings)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.eval.knn --fname knn/digits [key=value ...]``: exit status."""
    return protocol_main(KNNConfig, __doc__, lambda cfg, args: run(cfg), argv)


if __name__ == "__main__":
    raise SystemExit(main())
