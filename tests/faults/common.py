"""Helpers of the fault suite: subprocess environment, the repository root, time limits."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds any one subprocess may take before the test fails


def env() -> dict:
    """The current environment with one OpenMP thread and this checkout's ``src`` first."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), e.get("PYTHONPATH", "")])
    return e
