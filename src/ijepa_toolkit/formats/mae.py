"""``{"model": state_dict, ...}`` (MAE, DeiT, timm training scripts) or ``{"state_dict": ...}``
(Lightning), one encoder with any prefix (``encoder.``, ``model.``, ...) and an optional
classification ``head.*`` (dropped on load)."""

from __future__ import annotations

from ..io.read import RawCheckpoint
from .canonical import SINGLE, Contents, epoch_of, is_tensor_dict, scalars_of

NAME = "model"
DESCRIPTION = "{'model': state_dict} checkpoint"
KEYS = ("model", "state_dict")


def matches(raw: RawCheckpoint) -> bool:
    return raw.container == "torch" and any(is_tensor_dict(raw.obj.get(k)) for k in KEYS)


def read(raw: RawCheckpoint) -> Contents:
    obj = raw.obj
    key = next(k for k in KEYS if is_tensor_dict(obj.get(k)))
    other = [k for k in obj if k != key]
    return Contents(
        path=raw.path, format=NAME, encoders={SINGLE: obj[key]}, epoch=epoch_of(obj),
        other_keys=other, meta=scalars_of(obj, other),
    )  # fmt: skip
