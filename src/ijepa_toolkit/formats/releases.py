"""The published I-JEPA and StoP checkpoints, by short name, and where to find them on disk.

Each row is copied from its authors' README: facebookresearch/ijepa ``README.md`` @ 52c1ae95
("Pretrained models": arch, patch size, resolution, epochs, data, "full checkpoint" link) and
amirbar/StoP ``README.md`` @ 72206b3e ("Pretrained Models Zoo": arch, dataset, epochs, link; the
224 px resolution is ``crop_size`` in its ``configs/pretrain/vit-*.yaml``, its "ImageNet" is the
ILSVRC folder there). Epochs are the authors' (the IN22K file names say 900e/600e, their table
66/44). Neither README gives file sizes: the official ones are computed (float32, what the
official ``src/train.py`` saves: ``encoder`` + ``target_encoder`` + ``predictor`` + AdamW's two
moments of both trained models); StoP's repository has no training code to compute them from.

A release is found as ``<folder>/<file>`` in each folder of ``$IJEPA_CHECKPOINTS``
(``os.pathsep``-separated), then ``./checkpoints``: the shipped configs write
``checkpoints/<file>``. StoP files go in a ``stop/`` sub-folder (their published names,
``vit-b16.pth.tar``, ..., name no method).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError

ENV = "IJEPA_CHECKPOINTS"
DEFAULT_FOLDER = "checkpoints"
SUFFIX = ".pth.tar"
IJEPA = "facebookresearch/ijepa@52c1ae95d05f743e000e8f10a1f3a79b10cff048"
STOP = "amirbar/StoP@72206b3e0dc17934f590fcb90ed6e4569d60b043"
FB = "https://dl.fbaipublicfiles.com/ijepa/"
HF = "https://huggingface.co/amirbar1/StoP/resolve/main/"


@dataclass(frozen=True)
class Release:
    """One published checkpoint; ``resolution`` is the pretraining image side in pixels."""

    name: str  # short name, accepted as model.checkpoint; the file is name + ".pth.tar"
    arch: str
    resolution: int
    epochs: int
    data: str
    size: str  # as published, "≈ N GB (computed)", or "not published"
    url: str  # verbatim from the authors' README
    source: str  # owner/repo@commit of that README

    @property
    def file(self) -> str:
        """Its path inside a checkpoints folder, e.g. ``stop/vit-b16.pth.tar``."""
        return self.name + SUFFIX


RELEASES: tuple[Release, ...] = (
    Release("IN1K-vit.h.14-300e", "ViT-H/14", 224, 300, "ImageNet-1K", "≈ 10.4 GB (computed)",
            FB + "IN1K-vit.h.14-300e.pth.tar", IJEPA),
    Release("IN1K-vit.h.16-448px-300e", "ViT-H/16", 448, 300, "ImageNet-1K",
            "≈ 10.4 GB (computed)", FB + "IN1K-vit.h.16-448px-300e.pth.tar", IJEPA),
    Release("IN22K-vit.h.14-900e", "ViT-H/14", 224, 66, "ImageNet-22K", "≈ 10.4 GB (computed)",
            FB + "IN22K-vit.h.14-900e.pth.tar", IJEPA),
    Release("IN22K-vit.g.16-600e", "ViT-g/16", 224, 44, "ImageNet-22K", "≈ 16.5 GB (computed)",
            FB + "IN22K-vit.g.16-600e.pth.tar", IJEPA),
    Release("stop/vit-b16", "ViT-B/16", 224, 600, "ImageNet-1K", "not published",
            HF + "vit-b16.pth.tar?download=true", STOP),
    Release("stop/vit-l16", "ViT-L/16", 224, 600, "ImageNet-1K", "not published",
            HF + "vit-l16.pth.tar?download=true", STOP),
    Release("stop/vit-h16", "ViT-H/16", 224, 300, "ImageNet-1K", "not published",
            HF + "vit-h16.pth.tar?download=true", STOP),
)  # fmt: skip
BY_NAME = {r.name: r for r in RELEASES}


def find(source: str) -> Optional[Release]:
    """The release ``source`` names: its short name (``IN1K-vit.h.14-300e``), its file
    (``IN1K-vit.h.14-300e.pth.tar``) or ``checkpoints/<file>``, as the shipped configs write it;
    None for anything else."""
    text = Path(source).as_posix()
    text = text.removeprefix(DEFAULT_FOLDER + "/").removesuffix(SUFFIX)
    return BY_NAME.get(text)


def search_path() -> list[Path]:
    """The folders searched for a release: those in ``$IJEPA_CHECKPOINTS``, then ``checkpoints``."""
    listed = [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    return [*listed, Path(DEFAULT_FOLDER)]


def locate(release: Release) -> Path:
    """The release's file in the first folder of ``search_path()`` holding it; otherwise one
    ``CheckpointError`` line naming the address to download it from and where to put it."""
    folders = search_path()
    for folder in folders:
        if (folder / release.file).is_file():
            return folder / release.file
    searched = ", ".join(str(f / release.file) for f in folders)
    raise CheckpointError(
        f"{release.name} ({release.arch}, {release.source.split('@')[0]} release) not found "
        f"(looked for {searched}): download {release.url} and save it as "
        f"{(folders[0] / release.file).absolute()}, or set {ENV} to the folder holding "
        f"{release.file}"
    )
