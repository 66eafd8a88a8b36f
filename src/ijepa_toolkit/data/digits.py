"""scikit-learn's bundled digits (1797 real 8x8 scans) as a small ImageFolder for tests and demo.

No download: the images ship inside scikit-learn. They are upscaled (bicubic) to RGB squares and
split with a fixed, stratified train/val split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

MARKER = "digits.json"


def build_digits_imagefolder(
    root: Union[str, Path],
    size: int = 32,
    val_fraction: float = 0.25,
    seed: int = 0,
    per_class: int = 0,
) -> tuple[Path, Path]:
    """Write ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png``; returns both folders.

    Cached: a second call with the same arguments finds ``root/digits.json`` and writes nothing.
    ``per_class > 0`` keeps only that many images per class (before the split) for tiny tests.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    settings = {"size": size, "val_fraction": val_fraction, "seed": seed, "per_class": per_class}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root / "train", root / "val"
    digits = load_digits()
    images, labels = digits.images, digits.target
    index = np.arange(len(labels))
    if per_class > 0:
        index = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=labels[index]
    )
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in sorted(idx):
            pixels = (images[i] / 16.0 * 255.0).round().astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC)
            img.convert("RGB").save(root / split / str(labels[i]) / f"digit_{i:04d}.png")
    marker.write_text(json.dumps(settings))
    return root / "train", root / "val"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.data.digits ROOT [--size PX]``: write the ImageFolder."""
    import argparse

    parser = argparse.ArgumentParser(description="Write scikit-learn's digits as an ImageFolder")
    parser.add_argument("root", help="folder to write root/train/<digit>/ and root/val/<digit>/")
    parser.add_argument("--size", type=int, default=32, help="side of the upscaled RGB images (px)")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, val = build_digits_imagefolder(args.root, args.size, args.val_fraction, args.seed)
    print(f"{train}: {sum(1 for _ in train.rglob('*.png'))} images, "
          f"{val}: {sum(1 for _ in val.rglob('*.png'))} images")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
