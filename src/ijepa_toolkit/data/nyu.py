"""NYU-Depth v2 readers for the three forms it is distributed in, and the probe's transforms.

- ``mat``: the official ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5), read lazily with h5py.
  MATLAB stores arrays column-major, so h5py sees ``images`` as (N, 3, W, H) uint8 and ``depths``
  as (N, W, H) metres. Train/test images are picked by 1-based indices: ``splits.mat``
  (``trainNdxs`` / ``testNdxs``, the Eigen 795/654 split), as HDF5 or MATLAB v5, or a text file.
- ``folder``: the BTS / AdaBins / DINOv2-toolbox layout: RGB ``.jpg`` and 16-bit PNG depth in
  millimetres (0 = no measurement), listed by split files of ``rgb depth focal`` lines.
- ``tar``: webdataset-style shards: members ``<key>.jpg`` and ``<key>.depth.npy`` (metres).

Every reader is a map-style dataset of ``DepthSample`` (RGB (H, W, 3) uint8, depth (H, W)
float32 in metres). ``DepthPairs`` turns one into the tensors the probe trains and evaluates on.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("ijepa_toolkit")

PathLike = Union[str, os.PathLike]
FORMATS = ("mat", "folder", "tar")
DEFAULT_DEPTH_SCALE = {"mat": 1.0, "folder": 1e-3, "tar": 1.0}  # metres per stored unit
SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}


class DepthDataError(UserError):
    """Depth data that cannot be used; the message names the file and the problem."""


@dataclass
class DepthSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    depth: np.ndarray  # (H, W) float32 metres, 0 where there is no measurement
    name: str


def check_pair(image: np.ndarray, depth: np.ndarray, name: str) -> None:
    """Raise ``DepthDataError`` unless ``depth`` is (H, W) and ``image`` is (H, W, 3)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise DepthDataError(f"{name}: image has shape {image.shape}, expected (H, W, 3) RGB")
    if depth.ndim != 2:
        raise DepthDataError(f"{name}: depth has shape {depth.shape}, expected (H, W)")
    if image.shape[:2] != depth.shape:
        raise DepthDataError(
            f"{name}: depth map is {depth.shape[0]}x{depth.shape[1]} but the image is "
            f"{image.shape[0]}x{image.shape[1]}; they must be the same size"
        )


def read_split_indices(path: PathLike, key: str) -> np.ndarray:
    """0-based image indices from a split file holding 1-based ones (as MATLAB writes them).

    ``.mat`` files: variable ``key`` (``trainNdxs`` / ``testNdxs``) of an HDF5 (v7.3) or MATLAB
    v5 file. Anything else: a text file of whitespace-separated 1-based integers.
    """
    path = Path(path)
    if not path.is_file():
        raise DepthDataError(f"{path}: split file not found")
    if path.suffix == ".mat":
        values = _read_mat_variable(path, key)
    else:
        try:
            values = np.array([int(tok) for tok in path.read_text().split()], dtype=np.int64)
        except ValueError as e:
            raise DepthDataError(f"{path}: expected 1-based integer indices ({e})") from None
    values = np.asarray(values).reshape(-1).astype(np.int64)
    if values.size == 0:
        raise DepthDataError(f"{path}: split '{key}' is empty")
    if values.min() < 1:
        raise DepthDataError(
            f"{path}: split '{key}' holds index {values.min()}; indices are 1-based (MATLAB)"
        )
    return values - 1


def _read_mat_variable(path: Path, key: str) -> np.ndarray:
    import h5py

    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DepthDataError(f"{path}: no variable '{key}' (variables: {sorted(f.keys())})")
            return np.asarray(f[key][()])
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=[key])
    except (ValueError, OSError) as e:
        raise DepthDataError(f"{path}: not a readable MATLAB file ({e})") from None
    if key not in mat:
        raise DepthDataError(f"{path}: no variable '{key}'")
    return np.asarray(mat[key])


class NYULabeledMat(Dataset):
    """The official labeled file, one image per index, read lazily (one HDF5 handle per process)."""

    def __init__(self, path: PathLike, indices: Sequence[int], depth_scale: float = 1.0):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise DepthDataError(f"{self.path}: labeled .mat file not found")
        if not h5py.is_hdf5(self.path):
            raise DepthDataError(f"{self.path}: not a MATLAB v7.3 (HDF5) file")
        with h5py.File(self.path, "r") as f:
            for k in ("images", "depths"):
                if k not in f:
                    raise DepthDataError(f"{self.path}: no '{k}' dataset (has {sorted(f.keys())})")
            images, depths = f["images"].shape, f["depths"].shape
        if len(images) != 4 or images[1] != 3 or len(depths) != 3:
            raise DepthDataError(
                f"{self.path}: images {images} / depths {depths}; expected (N, 3, W, H) / (N, W, H)"
            )
        if images[0] != depths[0] or images[2:] != depths[1:]:
            raise DepthDataError(
                f"{self.path}: images {images} and depths {depths} disagree in count or size"
            )
        self.indices = np.asarray(indices, dtype=np.int64)
        bad = self.indices[(self.indices < 0) | (self.indices >= images[0])]
        if bad.size:
            raise DepthDataError(
                f"{self.path}: split entries {(bad[:5] + 1).tolist()} (1-based) are beyond its "
                f"{images[0]} images"
            )
        self.depth_scale = depth_scale
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.indices)

    def _h5(self):
        if self._file is None or self._pid != os.getpid():  # a forked worker opens its own
            import h5py

            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}

    def __getitem__(self, i: int) -> DepthSample:
        j = int(self.indices[i])
        f = self._h5()
        image = np.ascontiguousarray(f["images"][j].transpose(2, 1, 0))  # (3, W, H) -> (H, W, 3)
        depth = np.ascontiguousarray(f["depths"][j].T, dtype=np.float32) * self.depth_scale
        return DepthSample(image, depth.astype(np.float32), f"{self.path.name}[{j + 1}]")


def read_split_file(path: PathLike) -> list[tuple[int, str, str]]:
    """``(line number, rgb path, depth path)`` of each ``rgb depth [focal]`` line."""
    path = Path(path)
    if not path.is_file():
        raise DepthDataError(f"{path}: split file not found")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or fields[1] == "None":
            raise DepthDataError(
                f"{path}:{n}: expected 'rgb depth [focal]', found {line.strip()!r}"
            )
        entries.append((n, fields[0], fields[1]))
    if not entries:
        raise DepthDataError(f"{path}: no entries")
    return entries


class NYUFolder(Dataset):
    """RGB images and 16-bit PNG depth maps listed by a BTS-style split file.

    Paths in the file are relative to ``root``; a leading ``/`` is ignored, as in the BTS lists.
    Every listed file must exist.
    """

    def __init__(self, split_file: PathLike, root: PathLike, depth_scale: float = 1e-3):
        self.split_file = Path(split_file)
        root = Path(root)
        self.samples, missing = [], []
        for n, rgb, depth in read_split_file(self.split_file):
            pair = (root / rgb.lstrip("/"), root / depth.lstrip("/"))
            missing += [(n, p) for p in pair if not p.is_file()]
            self.samples.append((*pair, rgb.lstrip("/")))
        if missing:
            shown = "; ".join(f"line {n}: {p}" for n, p in missing[:3])
            raise DepthDataError(
                f"{self.split_file}: {len(missing)} listed file(s) missing, e.g. {shown}"
            )
        self.depth_scale = depth_scale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> DepthSample:
        rgb, depth_path, name = self.samples[i]
        with Image.open(rgb) as img:
            image = np.array(img.convert("RGB"))
        with Image.open(depth_path) as d:
            if d.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise DepthDataError(
                    f"{depth_path}: depth PNG has mode {d.mode}; expected single-channel 16-bit"
                )
            depth = np.asarray(d, dtype=np.float32) * self.depth_scale
        check_pair(image, depth, str(depth_path))
        return DepthSample(image, depth, name)


def _split_member_name(name: str) -> tuple[str, str]:
    """``a/b/0001.depth.npy`` -> (``a/b/0001``, ``depth.npy``): webdataset's key/extension rule."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class DepthTarShards(Dataset):
    """webdataset-style uncompressed ``.tar`` shards with ``<key>.jpg`` / ``<key>.depth.npy``.

    The shards are indexed once (member offsets), then each sample is read by seeking into its
    shard, so access is random and lazy and works in DataLoader workers.
    """

    def __init__(self, shards: Sequence[PathLike], depth_scale: float = 1.0,
                 image_ext: str = "jpg", depth_ext: str = "depth.npy"):  # fmt: skip
        if not shards:
            raise DepthDataError("no tar shards given")
        self.depth_scale = depth_scale
        self.samples: list[tuple[Path, str, tuple[int, int], tuple[int, int]]] = []
        for shard in map(Path, shards):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard, mode="r:") as tf:
                    for m in tf:
                        if m.isfile():
                            key, ext = _split_member_name(m.name)
                            members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError) as e:
                raise DepthDataError(
                    f"{shard}: not a readable uncompressed tar shard ({e})"
                ) from None
            for key, exts in members.items():
                lacking = [e for e in (image_ext, depth_ext) if e not in exts]
                if lacking:
                    raise DepthDataError(
                        f"{shard}: sample '{key}' has no '{lacking[0]}' member (has {sorted(exts)})"
                    )
                self.samples.append((shard, key, exts[image_ext], exts[depth_ext]))
        if not self.samples:
            raise DepthDataError(f"{list(map(str, shards))[:3]}: the shards hold no samples")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> DepthSample:
        shard, key, (img_off, img_size), (d_off, d_size) = self.samples[i]
        with open(shard, "rb") as f:
            f.seek(img_off)
            img_bytes = f.read(img_size)
            f.seek(d_off)
            depth_bytes = f.read(d_size)
        name = f"{shard.name}:{key}"
        with Image.open(io.BytesIO(img_bytes)) as img:
            image = np.array(img.convert("RGB"))
        try:
            depth = np.load(io.BytesIO(depth_bytes), allow_pickle=False)
        except ValueError as e:
            raise DepthDataError(f"{name}: depth.npy is not a plain numpy array ({e})") from None
        depth = np.squeeze(depth).astype(np.float32) * self.depth_scale
        check_pair(image, depth, name)
        return DepthSample(image, depth, name)


def build_depth_reader(
    fmt: str, root: PathLike, split: str, split_spec: str, depth_scale: Optional[float] = None
) -> Dataset:
    """The reader of ``fmt`` for ``split`` (``train`` / ``test``).

    ``split_spec``: ``mat``: ``splits.mat`` (key ``trainNdxs`` / ``testNdxs``) or a text list of
    1-based indices; ``folder``: the ``rgb depth focal`` list (RGB and depth paths under
    ``root``); ``tar``: a glob of shards. A relative ``split_spec`` is taken under ``root`` (for
    ``mat``: next to the ``.mat`` file).
    ``depth_scale``: metres per stored unit (default: 1 for ``mat``/``tar``, 1e-3 for PNGs).
    """
    if fmt not in FORMATS:
        raise DepthDataError(f"data.format={fmt!r}: expected one of {FORMATS}")
    scale = DEFAULT_DEPTH_SCALE[fmt] if depth_scale is None else depth_scale
    root = Path(root)
    base = root.parent if fmt == "mat" else root
    spec = Path(split_spec) if os.path.isabs(split_spec) else base / split_spec
    if fmt == "mat":
        return NYULabeledMat(root, read_split_indices(spec, SPLIT_KEYS[split]), scale)
    if fmt == "folder":
        return NYUFolder(spec, root, depth_scale=scale)
    shards = sorted(glob.glob(str(spec)))
    if not shards:
        raise DepthDataError(f"data.{split}_split: no tar shard matches {spec}")
    return DepthTarShards(shards, scale)


def input_size_for(height: int, width: int, scale: float, patch_size: int) -> tuple[int, int]:
    """``(h, w)`` the encoder sees: the frame scaled by ``scale``, rounded down to the patch."""
    h = max(patch_size, math.floor(height * scale / patch_size) * patch_size)
    w = max(patch_size, math.floor(width * scale / patch_size) * patch_size)
    return h, w


class DepthPairs(Dataset):
    """Probe inputs from a reader: ``{"image", "depth", "name"}`` (+ ``"rgb"`` when evaluating).

    ``image``: (3, h, w) float, ImageNet-normalised, resized (bilinear, antialiased) to
    ``input_size_for(H, W, input_scale, patch_size)``; ``depth``: (1, H, W) metres at the ground
    truth's own resolution (never resampled). Training (``crop_size`` set): a random
    ``crop_size`` crop of both, then a horizontal flip with probability 0.5 (torch RNG).
    ``rgb``: (H, W, 3) uint8 original, for the visualisations.
    """

    def __init__(self, reader: Dataset, patch_size: int, input_scale: float = 1.0,
                 crop_size: Optional[Sequence[int]] = None, flip: bool = True):  # fmt: skip
        self.reader = reader
        self.patch_size = patch_size
        self.input_scale = input_scale
        self.crop_size = tuple(crop_size) if crop_size else None
        self.flip = flip
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        s = self.reader[i]
        check_pair(s.image, s.depth, s.name)
        image = torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1)  # (3, H, W) uint8
        depth = torch.from_numpy(np.ascontiguousarray(s.depth))[None]  # (1, H, W)
        out = {"name": s.name}
        if self.crop_size is not None:
            ch, cw = self.crop_size
            _, h, w = depth.shape
            if ch > h or cw > w:
                raise DepthDataError(
                    f"{s.name}: data.crop_size {ch}x{cw} exceeds the {h}x{w} frame"
                )
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            image = image[:, top : top + ch, left : left + cw]
            depth = depth[:, top : top + ch, left : left + cw]
            if self.flip and bool(torch.rand(()) < 0.5):
                image, depth = image.flip(-1), depth.flip(-1)
        else:
            out["rgb"] = image.permute(1, 2, 0).contiguous()
        size = input_size_for(depth.shape[1], depth.shape[2], self.input_scale, self.patch_size)
        x = image.float().div(255.0)[None]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        out["image"] = (x - self.mean) / self.std
        out["depth"] = depth.contiguous()
        return out
