"""safetensors weights: ``ijepa-export`` output (plain timm names) or any safetensors encoder.

An export has its spec beside it (the same path with ``.json``: ``{"architecture", "kwargs",
"pretrained_cfg_overlay"}``); its ``kwargs.num_heads`` is used, so an exported encoder of a
non-standard width loads without ``num_heads``. Other files beside the weights are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..io.read import RawCheckpoint
from .canonical import SINGLE, Contents, is_tensor_dict

NAME = "safetensors"
DESCRIPTION = "safetensors weights file"


def matches(raw: RawCheckpoint) -> bool:
    return raw.container == "safetensors" and is_tensor_dict(raw.obj)


def read(raw: RawCheckpoint) -> Contents:
    heads = spec_num_heads(raw.path.with_suffix(".json"))
    return Contents(path=raw.path, format=NAME, encoders={SINGLE: raw.obj}, num_heads=heads)


def spec_num_heads(spec_path: Path) -> Optional[int]:
    """``kwargs.num_heads`` of an ``ijepa-export`` spec file; None when there is no such spec."""
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError):
        return None
    kwargs = spec.get("kwargs") if isinstance(spec, dict) and "architecture" in spec else None
    heads = kwargs.get("num_heads") if isinstance(kwargs, dict) else None
    return heads if isinstance(heads, int) and not isinstance(heads, bool) else None
