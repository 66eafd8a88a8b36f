"""Source formats: one module per format, one registry, one recognition for load and inspect.

``locate`` turns what a user passes into the file to read: a ``save_pretrained`` folder into
its weights file, an official or StoP release's short name into its file in the checkpoints
folders (``releases.py``), a timm pretrained name into its cached file. Each format module has
``NAME``, ``DESCRIPTION``, ``matches(raw) -> bool`` and ``read(raw) -> Contents``
(``canonical.py``); it imports only ``io/``, ``errors``, ``models/``
specs and ``canonical``, never another format. Adding a format is one new module plus its place
in ``FORMATS`` (the first module that matches wins: specific layouts before generic ones).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..errors import CheckpointError
from ..io.read import PathLike, RawCheckpoint
from . import (
    featurenorm,
    hf,
    ijepa_enhanced,
    mae,
    official,
    releases,
    safetensors,
    state_dict,
    timm_names,
    tiny_ijepa,
    toolkit,
)
from .canonical import Contents

FORMATS: tuple[ModuleType, ...] = (
    hf,
    safetensors,
    tiny_ijepa,
    featurenorm,
    ijepa_enhanced,
    toolkit,
    official,
    mae,
    state_dict,
)
DESCRIPTIONS = {f.NAME: f.DESCRIPTION for f in FORMATS}


def locate(source: PathLike) -> Path:
    """The file to read for ``source``: a path as is; a transformers ``save_pretrained`` folder ->
    its weights file. Names that are not an existing path: a release's short name, file name or
    ``checkpoints/<file>`` (``IN1K-vit.h.14-300e``, ``stop/vit-b16``) -> that file in
    ``$IJEPA_CHECKPOINTS`` or ``./checkpoints``; a timm pretrained name -> its cached weights file.
    ``CheckpointError`` saying what to download and where to put it when a named file is absent."""
    path = Path(source)
    if path.is_dir():
        return hf.locate(path) or path
    if path.exists():
        return path
    release = releases.find(str(source))
    if release is not None:
        return releases.locate(release)
    return timm_names.locate(str(source)) or path


def recognise(raw: RawCheckpoint) -> ModuleType:
    """The format module of a read file; ``CheckpointError`` when none matches."""
    for fmt in FORMATS:
        if fmt.matches(raw):
            return fmt
    keys = ", ".join(map(str, list(raw.obj)[:8]))
    raise CheckpointError(f"{raw.path}: no encoder weights found (top-level keys: {keys})")


def contents_of(raw: RawCheckpoint) -> Contents:
    """The file's weights and architecture hints, read by its format module."""
    return recognise(raw).read(raw)
