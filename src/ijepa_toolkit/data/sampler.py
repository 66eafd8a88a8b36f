"""Rank shards of a dataset: seeded per-epoch shuffles that resume mid-epoch, eval without padding.

torch's ``DistributedSampler`` pads the evaluation set with repeated images (counted twice) and
cannot start part-way through an epoch; this sampler does neither.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``range(num_samples)``, every ``world_size``-th index.

    ``shuffle=True`` (training): one permutation per epoch from ``seed + epoch``, the same on every
    rank, truncated to a multiple of ``world_size`` so every rank has as many samples. Consecutive
    per-rank batches of ``b`` then make up the same global batches of ``b * world_size`` images as
    one process with batch ``b * world_size``. ``set_epoch(epoch, start=k)`` skips the rank's
    first ``k`` samples (an exact mid-epoch resume).

    ``shuffle=False`` (evaluation): indices in order, nothing dropped or repeated: over all ranks
    every sample is seen exactly once; shards differ in length by at most one.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
    ):
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order and skip this rank's first ``start`` samples."""
        self.epoch = epoch
        self.start = start

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.num_samples, self.world_size))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        order = order[: self.num_samples - self.num_samples % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        if self.shuffle:
            shard = self.num_samples // self.world_size
        else:
            shard = len(range(self.rank, self.num_samples, self.world_size))
        return max(shard - self.start, 0)
