"""Shared fixtures: the official-format I-JEPA checkpoint in tests/fixtures and what it computes.

The checkpoint is a tiny ViT (width 64, 4 heads, depth 4, patch 8, 32x32 images, predictor width
32); 64 is not a standard width, so loading it needs ``num_heads=4``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ijepa_toolkit import load_encoder

FIXTURES = Path(__file__).parent / "fixtures"
CKPT = FIXTURES / "ijepa_vit_p8_d64.pth.tar"
EXPECTED = FIXTURES / "ijepa_vit_p8_d64_expected.pt"
ARCH_JSON = FIXTURES / "ijepa_vit_p8_d64.json"
NUM_HEADS = 4


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread sync stalls on a busy 2-core machine
    (``make test`` also sets OMP_NUM_THREADS=1 for the subprocesses the tests start)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_toolkit_logger():
    """Each test starts with the ``ijepa_toolkit`` logger as a new process has it: in-process
    ``main()`` calls install a console handler that would otherwise print into later tests."""
    log = logging.getLogger("ijepa_toolkit")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])
    log.propagate = saved[2]


@pytest.fixture(scope="session")
def ckpt_path() -> Path:
    """The official-format checkpoint (read-only file)."""
    return CKPT


@pytest.fixture(scope="session")
def fixture_arch() -> dict:
    return json.loads(ARCH_JSON.read_text())


@pytest.fixture(scope="session")
def expected() -> dict:
    """What the official model code computes on ``expected["input"]`` (float32, eval mode)."""
    return torch.load(EXPECTED, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def images(expected) -> torch.Tensor:
    return expected["input"]


@pytest.fixture(scope="session")
def _official_raw() -> dict:
    return torch.load(CKPT, map_location="cpu", weights_only=True)


@pytest.fixture
def official_ckpt(_official_raw) -> dict:
    """A fresh copy of the whole checkpoint dict, safe to modify."""
    return {k: _clone(v) for k, v in _official_raw.items()}


@pytest.fixture
def target_sd(_official_raw) -> dict:
    """The target encoder's state dict without the DDP ``module.`` prefix (a fresh copy)."""
    return {
        k.removeprefix("module."): v.clone() for k, v in _official_raw["target_encoder"].items()
    }


@pytest.fixture(scope="session")
def target_encoder():
    """The loaded target encoder; do not modify it (load a fresh one instead)."""
    return load_encoder(CKPT, num_heads=NUM_HEADS)


@pytest.fixture(scope="session")
def context_encoder():
    """The loaded context encoder (``which="encoder"``); do not modify it."""
    return load_encoder(CKPT, which="encoder", num_heads=NUM_HEADS)


def _clone(v):
    if torch.is_tensor(v):
        return v.clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clone(x) for x in v]
    return v
