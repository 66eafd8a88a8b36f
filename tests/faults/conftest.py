"""Fixtures of the fault suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from ijepa_toolkit.data.synthetic_depth import write_synthetic_nyu


@pytest.fixture(scope="session")
def depth_scenes(tmp_path_factory) -> Path:
    """64 train / 8 test rendered 48x64 scenes with exact depth (BTS folder layout)."""
    return write_synthetic_nyu(tmp_path_factory.mktemp("syn") / "nyu", 64, 8, 48, 64, seed=3)
