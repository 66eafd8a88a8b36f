"""Training subsets: ImageNet-style name lists (``1percent.txt``) or N images per class.

A subset file holds one image file name per line (``n01440764_10026.JPEG``), as the published
``1percent.txt`` / ``10percent.txt`` and ``Nimgs_class.txt`` files of the semi-supervised I-JEPA,
MSN and SimCLR protocols; names are matched against the file names of an ImageFolder, or against
``class_folder/file_name`` for datasets whose file names repeat across classes. ``per_class``
subsets are drawn with a seeded generator, so they are reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import UserError

logger = logging.getLogger("ijepa_toolkit")


class SubsetError(UserError):
    """A subset that cannot be built; the message names the file and the problem."""


@dataclasses.dataclass
class SubsetSection:
    """A training subset: a file of image names (``1percent.txt`` style) or N images per class."""

    file: Optional[str] = None  # one image file name per line (``1percent.txt``)
    per_class: int = 0  # > 0: this many images per class, drawn with ``seed``
    seed: int = 0  # seed of the per_class draw

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        return [("per_class", self.per_class, self.per_class >= 0, ">= 0 (0: no subset)")]


def subset_of(dataset: Any, subset: SubsetSection) -> Optional[list[int]]:
    """Sorted indices of ``subset`` in an ImageFolder ``dataset`` (``samples``, ``classes``,
    ``targets``); None when the section asks for no subset (the whole dataset)."""
    if subset.file:
        names = read_subset_file(subset.file)
        return indices_from_names(dataset.samples, dataset.classes, names, subset.file)
    if subset.per_class > 0:
        return per_class_indices(dataset.targets, dataset.classes, subset.per_class, subset.seed)
    return None


def read_subset_file(path: Union[str, Path]) -> list[str]:
    """File names listed in ``path``, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SubsetError(f"{path}: cannot read subset file ({e.strerror or e})") from None
    names = [ln.strip().split()[0] for ln in text.splitlines() if ln.strip() and ln[0] != "#"]
    if not names:
        raise SubsetError(f"{path}: subset file lists no image names")
    return names


def _check_classes(targets: Sequence[int], classes: Sequence[str], what: str) -> None:
    present = set(int(t) for t in targets)
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        more = f" (+{len(empty) - 5} more)" if len(empty) > 5 else ""
        raise SubsetError(f"{what}: no images for class(es) {', '.join(empty[:5])}{more}")


def _keys(path: str) -> tuple[str, str]:
    """``(file name, class folder/file name)`` of an ImageFolder sample path."""
    p = Path(path)
    return p.name, f"{p.parent.name}/{p.name}"


def indices_from_names(
    samples: Sequence[tuple[str, int]], classes: Sequence[str], names: Sequence[str], source: str
) -> list[int]:
    """Indices of ``samples`` ((path, class) pairs) listed in ``names``, sorted.

    An entry is a file name (``n01440764_10026.JPEG``) or, where file names repeat across
    classes, ``class_folder/file_name``. Every entry must match exactly one sample (the first few
    missing or ambiguous ones are reported) and every class must keep at least one image.
    """
    by_key: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(samples):
        for key in _keys(path):
            by_key.setdefault(key, []).append(i)
    missing = [n for n in names if n not in by_key]
    if missing:
        raise SubsetError(
            f"{source}: {len(missing)} of {len(names)} listed images are not in the dataset, "
            f"e.g. {', '.join(missing[:5])}"
        )
    ambiguous = [n for n in names if len(by_key[n]) > 1]
    if ambiguous:
        n = ambiguous[0]
        where = ", ".join(_keys(samples[i][0])[1] for i in by_key[n][:3])
        raise SubsetError(
            f"{source}: {len(ambiguous)} listed file names occur in several classes, e.g. {n} "
            f"({where}); list them as class_folder/file_name"
        )
    index = sorted({by_key[n][0] for n in names})
    _check_classes([samples[i][1] for i in index], classes, source)
    return index


def per_class_indices(
    targets: Sequence[int], classes: Sequence[str], per_class: int, seed: int
) -> list[int]:
    """``per_class`` indices of each class drawn without replacement with ``seed``; sorted.

    A class with fewer images keeps all of them (with a warning); a class with none is an error.
    """
    if per_class < 1:
        raise SubsetError(f"subset.per_class must be >= 1, got {per_class}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    _check_classes(targets, classes, f"subset.per_class={per_class}")
    chosen = []
    for c in range(len(classes)):
        idx = np.flatnonzero(targets == c)
        if len(idx) < per_class:
            logger.warning(
                "class %s has %d images < subset.per_class=%d; using all", classes[c], len(idx),
                per_class,
            )  # fmt: skip
        chosen.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return sorted(int(i) for i in np.concatenate(chosen))
