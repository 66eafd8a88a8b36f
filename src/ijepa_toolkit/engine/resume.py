"""Training state for exact resume: weights, optimizer, scaler, counters and every RNG state.

Saved with the atomic ``save_checkpoint`` and read back with ``weights_only=True``. Under DDP each
rank's RNG state is gathered, so every rank resumes its own random stream.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..io.read import read_checkpoint
from ..io.save import save_checkpoint
from .utils import rng_state, set_rng_state

logger = logging.getLogger("ijepa_toolkit")
LAST = "checkpoint-last.pth"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order (under DDP every rank must call it)."""
    if dist.is_available() and dist.is_initialized():
        objs = [None] * dist.get_world_size()
        dist.all_gather_object(objs, obj)
        return objs
    return [obj]


def gather_rng_states() -> list:
    """Every rank's RNG state, in rank order (under DDP every rank must call it)."""
    return gather_objects(rng_state())


def save_training_state(
    path: Union[str, Path],
    *,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[Any] = None,
    epoch: int = 0,
    step: int = 0,
    is_main: bool = True,
    **extra: Any,
) -> None:
    """Write ``path`` atomically (main rank only; every rank must call it: RNG states are gathered).

    ``epoch`` is the number of finished epochs, ``step`` the number of optimizer steps taken.
    ``extra`` holds plain values (config dict, best metric, model EMA state dict, ...).
    """
    rngs = gather_rng_states()
    if not is_main:
        return
    obj = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rngs,
        **extra,
    }
    save_checkpoint(obj, path)


def load_training_state(
    path: Union[str, Path],
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[Any] = None,
    rank: int = 0,
    restore_rng: bool = True,
) -> dict:
    """Restore what ``save_training_state`` wrote; returns the checkpoint dict (epoch, step)."""
    obj = read_checkpoint(path)
    if "model" not in obj or "epoch" not in obj:
        raise CheckpointError(
            f"{path}: not a resumable training checkpoint (keys: {list(obj)[:8]})"
        )
    for part, key in ((unwrap(model), "model"), (optimizer, "optimizer"), (scaler, "scaler")):
        if part is not None and obj.get(key) is not None:
            load_part(part, obj[key], path, key)
    if restore_rng and obj.get("rng"):
        restore_rng_states(obj["rng"], rank, path)
    logger.info("resumed from %s: epoch %s, step %s", path, obj["epoch"], obj.get("step"))
    return obj


def load_part(part: Any, state: Any, path: Union[str, Path], key: str) -> None:
    """``part.load_state_dict(state)``; a mismatch is a ``CheckpointError`` naming file and key."""
    try:
        part.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # torch's messages name no file
        detail = " ".join(str(e).split())[:400]
        raise CheckpointError(
            f"{path}: its {key} state does not fit this run's {key} (was the config changed "
            f"since it was written? resume with the same settings or a new logging.folder): "
            f"{detail}"
        ) from None


def restore_rng_states(states: list, rank: int, path: Union[str, Path] = "") -> None:
    """Set this rank's RNG state from ``gather_rng_states()`` output (rank 0's if it has none)."""
    if len(states) <= rank:
        logger.warning(
            "%s: saved with %d ranks; rank %d reuses rank 0's RNG", path, len(states), rank
        )
    set_rng_state(states[rank] if rank < len(states) else states[0])
