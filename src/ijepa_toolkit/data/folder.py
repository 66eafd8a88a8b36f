"""ImageFolder that skips unreadable images with a warning instead of crashing an epoch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder

logger = logging.getLogger("ijepa_toolkit")
# PIL only warns between MAX_IMAGE_PIXELS and twice that: the warning is turned into an error
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning)  # fmt: skip


class SafeImageFolder(ImageFolder):
    """torchvision ``ImageFolder``; a corrupt or unreadable image yields ``None`` and a warning.

    ``on_error="raise"`` re-raises instead. Use ``collate_skip_none`` in the DataLoader so a
    skipped image simply leaves its batch one shorter. Empty or missing roots are clear errors.
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None,
                 on_error: str = "skip"):  # fmt: skip
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: image folder not found")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{root}: no images found in class folders ({e})") from None
        self.on_error = on_error

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img = to_rgb(img)
        except BAD_IMAGE_ERRORS as e:
            if self.on_error == "raise":
                raise OSError(f"{path}: unreadable image ({e})") from e
            logger.warning("skipping unreadable image %s (%s)", path, e)
            return None
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16/32-bit integer images are scaled (PIL clips them to 255)."""
    if img.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNG), 0..65535
        values = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0
        img = Image.fromarray(values.round().astype(np.uint8))
    return img.convert("RGB")


def collate_skip_none(batch: list):
    """``default_collate`` of the samples that are not ``None``; ``None`` if none is left."""
    kept = [b for b in batch if b is not None]
    return default_collate(kept) if kept else None
