"""I-JEPA finetuning and evaluation toolkit.

>>> import ijepa_toolkit as ijt
>>> enc = ijt.load_encoder("IN1K-vit.h.14-300e.pth.tar")   # timm VisionTransformer, eval mode
>>> feats = enc(images)                                      # (B, D) mean of final-norm tokens

The names below are imported on first use (PEP 562 ``__getattr__``), so ``import ijepa_toolkit``
and every entrypoint's ``--help`` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_WHERE = {
    "CheckpointError": ".errors",
    "apply_masks": ".models.vit",
    "encode_masked": ".models.vit",
    "export_encoder": ".export",
    "inspect_checkpoint": ".loader",
    "load_encoder": ".loader",
    "load_predictor": ".loader",
    "save_checkpoint": ".io.save",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ijepa_toolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
