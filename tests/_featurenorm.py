"""Shared helpers of the tests against tests/fixtures/featurenorm (see its README.md)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "featurenorm"
SEED_PAD = -100  # the seeds' padding sample id (MASK_SAMPLE_ID / MASK_ID)


def load(name: str) -> dict:
    """The tensors of ``tests/fixtures/featurenorm/<name>.safetensors``."""
    return load_file(FIXTURES / f"{name}.safetensors")


def toolkit_ids(ids: torch.Tensor) -> torch.Tensor:
    """Seed sample ids (padding -100) -> the toolkit's (padding -1)."""
    return ids.masked_fill(ids == SEED_PAD, -1)


def sub_state(state: dict, prefix: str, rename: tuple = ()) -> dict:
    """The ``prefix``-ed entries of ``state`` without the prefix, with ``rename`` applied to
    the remaining key parts (``((old, new), ...)``)."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            key = key[len(prefix) :]
            for old, new in rename:
                key = key.replace(old, new)
            out[key] = value
    return out
