"""Seeding, RNG state for exact resume, autocast, progress bars."""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Iterable, Optional

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets ``seed + rank``."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    """Every RNG state a run depends on, for an exact resume (saved in checkpoints)."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_python_state(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> dict:
    """numpy's global RNG state as tensors and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _to_python_state(state):
    """``random.setstate`` needs tuples; a checkpoint round trip may give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
    """bf16 (or the given dtype) autocast on CUDA; a no-op on the CPU, which runs fp32."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def progress(iterable: Iterable, desc: str = "", total: Optional[int] = None, enabled: bool = True):
    """A tqdm bar when stderr is a terminal (and ``enabled``); the bare iterable otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
