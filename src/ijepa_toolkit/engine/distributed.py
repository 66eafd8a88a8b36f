"""torch.distributed setup from the torchrun environment; a single process needs none of it.

torch is imported inside the functions (importing this module does not import it)."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Optional

from ..errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None  # None: the CPU

    def __post_init__(self) -> None:
        if self.device is None:
            import torch

            self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``meta.device``: ``auto`` picks CUDA when available, else the CPU; ``cuda`` is the local
    rank's GPU, ``cuda:N`` GPU N. Anything else, or a GPU this machine lacks, is a ``UserError``."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or not (index.isdigit() or index == ""):
        raise UserError(f"meta.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise UserError(f"meta.device={name}: CUDA is not available here (use auto or cpu)")
    gpu = int(index) if index else local_rank
    if gpu >= torch.cuda.device_count():
        raise UserError(f"meta.device={name}: GPU {gpu} asked, {torch.cuda.device_count()} found")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK).

    NCCL on CUDA, gloo on CPU. Without those variables this is a single process, no group.
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank,
            world_size=world_size,
        )  # fmt: skip
    return DistInfo(rank, world_size, local_rank, dev)


def group() -> Optional[ModuleType]:
    """``torch.distributed`` when a process group is up, else None. Asking does not import
    torch: no group can exist before ``torch.distributed`` was imported."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    if dist := group():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); a no-op in a single process."""
    if dist := group():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks (their first dims may differ)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def cleanup(finished: bool = False) -> None:
    """Leave the process group, if any (a no-op that imports nothing in a single process).

    ``finished`` (the run ended normally on this rank): first wait for every rank, so that no
    rank tears its connections down while another still uses them (gloo then aborts a rank
    with "terminate called without an active exception"). After an error no rank waits: the
    others may never arrive, and torchrun stops them once this rank has exited."""
    if dist := group():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
