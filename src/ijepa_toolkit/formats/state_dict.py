"""A bare encoder state dict (``torch.save(encoder.state_dict())``), any prefix."""

from __future__ import annotations

from ..io.read import RawCheckpoint
from .canonical import SINGLE, Contents, is_tensor_dict

NAME = "state_dict"
DESCRIPTION = "bare state dict"


def matches(raw: RawCheckpoint) -> bool:
    return raw.container == "torch" and is_tensor_dict(raw.obj)


def read(raw: RawCheckpoint) -> Contents:
    return Contents(path=raw.path, format=NAME, encoders={SINGLE: raw.obj})
