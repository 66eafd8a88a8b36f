"""ImageFolder that skips unreadable images with a warning instead of crashing an epoch.

Class folders are walked following symlinks, each real folder once: a link back to a folder
already read (a loop, or a second link to it) is skipped, counted and logged, never read again.
An image whose shape is outside the bounds (``MAX_ASPECT``) is skipped like an unreadable one,
from its header, before any pixel is decoded.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

logger = logging.getLogger("ijepa_toolkit")
# PIL only warns between MAX_IMAGE_PIXELS and twice that: the warning is turned into an error
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning)  # fmt: skip
# long side / short side: resizing the short side of a 1 x 4000 image to 256 px would make a
# 256 x 1,024,000 image (750 MiB); real photos (panoramas included) stay far below this
MAX_ASPECT = 50


class ImageShapeError(ValueError):
    """An image whose sides are outside the bounds (``check_shape``)."""


def check_shape(width: int, height: int, max_aspect: float = MAX_ASPECT) -> None:
    """Raise ``ImageShapeError`` unless both sides are >= 1 px and long / short <= max_aspect."""
    short, long = min(width, height), max(width, height)
    if short < 1 or long > max_aspect * short:
        raise ImageShapeError(
            f"{width}x{height} px: aspect ratio beyond {max_aspect}:1 (resizing its short side "
            "would blow up the long side)"
        )


class SafeImageFolder(ImageFolder):
    """torchvision ``ImageFolder``; a corrupt or unreadable image yields ``None`` and a warning.

    ``on_error="raise"`` re-raises instead. Use ``collate_skip_none`` in the DataLoader so a
    skipped image simply leaves its batch one shorter. Empty or missing roots are clear errors.
    ``link_loops``: folders skipped because their real path was already read in that class.
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

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False) -> list[tuple[str, int]]:  # fmt: skip
        """torchvision's samples (same order), each real folder of a class read once."""
        if is_valid_file is None:

            def is_valid_file(path: str) -> bool:
                return has_file_allowed_extension(path, extensions)

        self.link_loops = 0
        samples = []
        for name in sorted(class_to_idx):
            roots, loops = walk_once(os.path.join(directory, name))
            self.link_loops += loops
            samples += [(os.path.join(root, f), class_to_idx[name]) for root, files in roots
                        for f in files if is_valid_file(os.path.join(root, f))]  # fmt: skip
        found = {target for _, target in samples}
        empty = [name for name, target in class_to_idx.items() if target not in found]
        if empty and not allow_empty:
            raise FileNotFoundError(
                f"Found no valid file for the classes {', '.join(sorted(empty))}"
            )
        return samples

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    check_shape(*img.size)
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


def walk_once(folder: str) -> tuple[list[tuple[str, list[str]]], int]:
    """``(root, sorted file names)`` of each folder under ``folder``, symlinks followed, sorted by
    root (torchvision's order), and the number of folders skipped because their real path was
    already walked (a symlink loop or a second link to one folder), each logged."""
    seen, roots, loops = set(), [], 0
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            logger.warning(
                "skipping %s: it is %s again (symlink loop or duplicate link)", root, real
            )
            loops += 1
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        roots.append((root, sorted(files)))
    return sorted(roots), loops


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
