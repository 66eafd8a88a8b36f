"""Frozen features, extracted once and cached on disk; every frozen-feature protocol reads them.

Layer specs: ``last`` is the mean of the final-norm tokens (the official pooling), (N, D);
``concat4`` the last 4 blocks, each through the final norm and averaged over tokens,
concatenated (the VISSL protocol of the I-JEPA paper), (N, 4*D).

The cache key is a SHA-256 of: the checkpoint content (or arch + seed for a random init), the
sub-model and loading options, the layer spec, the transform's ``repr`` and the dataset listing
(class names, relative paths, file sizes). Each entry is a folder ``<cache_dir>/<key>/`` with
``features.npy`` (float32, memory-mapped), ``labels.npy`` (int64, -1 for an unreadable image)
and ``meta.json`` (the key's parts and a SHA-256 of both arrays, checked when reused). Extraction
streams batches into the memory-mapped file, so memory does not grow with the dataset; under
torchrun each rank extracts a contiguous slice into the same file, and rank 0 publishes the entry
with an atomic rename.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import EncoderSection
from ..data.folder import SafeImageFolder, collate_skip_none
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ..engine.distributed import DistInfo, all_reduce_sum, barrier
from ..engine.logger import write_json_atomic
from ..engine.utils import autocast, progress
from ..models.heads import feature_dim, pooled_features

logger = logging.getLogger("ijepa_toolkit")

LAYERS = {"last": "avg", "concat4": "concat4"}  # layer spec -> models.heads pooling
CACHE_VERSION = 1
HASH_CHUNK = 1 << 24


@dataclass
class EvalDataSection:
    """Image folders (``class/image`` layout) and the evaluation transform.

    Default transform: resize the short side to 256 (bicubic), center-crop 224, ImageNet mean/std.
    """

    train_folder: str = ""
    val_folder: str = ""
    img_size: int = 224
    crop_ratio: float = 0.875  # resize to img_size / crop_ratio before the center crop
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD))
    batch_size: int = 128  # images per extraction batch, per rank
    num_workers: int = 4


@dataclass
class FeaturesSection:
    """Which features and where they are cached."""

    layers: str = "last"  # last | concat4
    cache_dir: str = "cache/features"


@dataclass
class FeatureSet:
    """Features of the readable images of a split: ``feats`` (N, D) float32, ``labels`` (N,)."""

    feats: np.ndarray
    labels: np.ndarray
    classes: list[str]
    path: Path
    reused: bool


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_digest(
    path: Union[str, Path], cache_dir: Union[str, Path], remember: bool = True
) -> str:
    """SHA-256 of a checkpoint file, remembered by (path, size, mtime) so huge files hash once.

    ``remember=False`` reads the memo but does not write it (ranks other than 0)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    st = path.stat()
    memo_path = Path(cache_dir) / "checkpoint_digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if stamp not in memo:
        memo[stamp] = file_sha256(path)
        if remember:
            write_json_atomic(memo, memo_path)
    return memo[stamp]


def model_identity(
    model: EncoderSection, seed: int, cache_dir: Union[str, Path], remember: bool = True
) -> dict:
    """What determines the encoder's weights: checkpoint content + options, or arch + seed."""
    opts = {"num_heads": model.num_heads, "pos_embed": model.pos_embed}
    if model.checkpoint:
        digest = checkpoint_digest(model.checkpoint, cache_dir, remember)
        return {"checkpoint_sha256": digest, "which": model.which, **opts}
    return {"random_init": model.arch, "seed": seed, **opts}


def dataset_listing(dataset: SafeImageFolder) -> dict:
    """Class names and a SHA-256 of the (relative path, size, class) of every sample."""
    root = Path(dataset.root)
    h = hashlib.sha256()
    for path, target in dataset.samples:
        rel = os.path.relpath(path, root)
        h.update(f"{rel}\t{os.path.getsize(path)}\t{target}\n".encode())
    return {"classes": list(dataset.classes), "num_samples": len(dataset), "files": h.hexdigest()}


def build_eval_dataset(
    folder: str, data: EvalDataSection, indices: Optional[Sequence[int]] = None
) -> SafeImageFolder:
    """A ``SafeImageFolder`` with the evaluation transform, optionally restricted to ``indices``."""
    if not folder:
        raise ValueError("image folder not set: give data.train_folder and data.val_folder")
    tf = eval_transform(data.img_size, data.crop_ratio, data.mean, data.std)
    ds = SafeImageFolder(folder, transform=tf)
    if indices is not None:
        ds.samples = [ds.samples[i] for i in indices]
        ds.imgs = ds.samples
        ds.targets = [t for _, t in ds.samples]
    return ds


def cache_key(identity: dict, layers: str, dataset: SafeImageFolder) -> tuple[str, dict]:
    """(hex key, its parts) for features of ``dataset`` through the encoder ``identity``."""
    if layers not in LAYERS:
        raise ValueError(f"features.layers must be one of {list(LAYERS)}, got {layers!r}")
    parts = {
        "version": CACHE_VERSION,
        "model": identity,
        "layers": layers,
        "transform": repr(dataset.transform),
        "dataset": dataset_listing(dataset),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32], parts


class _Indexed(Dataset):
    """Items ``(image, target, index)`` of ``dataset`` at ``indices``; ``None`` if unreadable."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        item = self.dataset[j]
        return None if item is None else (item[0], item[1], j)


def _broadcast_flag(flag: bool, dist_info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank."""
    t = torch.tensor([int(flag) if dist_info.is_main else 0], device=dist_info.device)
    return bool(all_reduce_sum(t).item())


@torch.inference_mode()
def extract_to(
    encoder: torch.nn.Module,
    dataset: Dataset,
    folder: Path,
    layers: str,
    dist_info: DistInfo,
    batch_size: int = 128,
    num_workers: int = 0,
    use_bfloat16: bool = True,
) -> None:
    """Stream pooled features of ``dataset`` into ``folder/features.npy`` and ``labels.npy``.

    Every rank calls this; each extracts a contiguous slice (bf16 autocast on CUDA).
    """
    n, dim = len(dataset), feature_dim(encoder, LAYERS[layers])
    if dist_info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(folder / "features.npy", "w+", np.float32, (n, dim)).flush()
        labels = np.lib.format.open_memmap(folder / "labels.npy", "w+", np.int64, (n,))
        labels[:] = -1
        labels.flush()
        del labels
    barrier()
    feats_mm = np.load(folder / "features.npy", mmap_mode="r+")
    labels_mm = np.load(folder / "labels.npy", mmap_mode="r+")
    shard = np.array_split(np.arange(n), dist_info.world_size)[dist_info.rank]
    loader = DataLoader(
        _Indexed(dataset, shard), batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate_skip_none, pin_memory=dist_info.device.type == "cuda",
    )  # fmt: skip
    encoder = encoder.to(dist_info.device).eval()
    pool = LAYERS[layers]
    bar = progress(loader, desc=f"features {layers}", enabled=dist_info.is_main)
    for batch in bar:
        if batch is None:
            continue
        images, targets, index = batch
        with autocast(dist_info.device, use_bfloat16):
            out = pooled_features(encoder, images.to(dist_info.device, non_blocking=True), pool)
        feats_mm[index.numpy()] = out.float().cpu().numpy()
        labels_mm[index.numpy()] = targets.numpy()
    feats_mm.flush()
    labels_mm.flush()
    del feats_mm, labels_mm
    barrier()


def _verify_entry(entry: Path, key: str) -> Optional[str]:
    """None if ``entry`` is a complete cache entry for ``key``, else what is wrong with it."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    if meta.get("key") != key:
        return f"meta.json names key {meta.get('key')!r}"
    for name in ("features", "labels"):
        path = entry / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"{path.name} unreadable ({e})"
        if list(arr.shape) != meta.get(f"{name}_shape"):
            return f"{path.name} has shape {list(arr.shape)}, not {meta.get(f'{name}_shape')}"
        del arr
        if file_sha256(path) != meta.get(f"{name}_sha256"):
            return f"{path.name} content does not match its checksum"
    return None


def load_or_extract(
    dataset: SafeImageFolder,
    identity: dict,
    make_encoder: Callable[[], torch.nn.Module],
    layers: str,
    cache_dir: Union[str, Path],
    dist_info: DistInfo,
    batch_size: int = 128,
    num_workers: int = 0,
    use_bfloat16: bool = True,
) -> FeatureSet:
    """Features of ``dataset`` from the cache, extracting (with ``make_encoder()``) on a miss.

    A corrupt entry is re-extracted with a warning; an entry for another checkpoint, layer,
    transform or listing has another key and is never read. Every rank must call this.
    """
    key, parts = cache_key(identity, layers, dataset)
    cache_dir = Path(cache_dir)
    entry = cache_dir / key
    problem = None
    if dist_info.is_main and entry.exists():
        problem = _verify_entry(entry, key)
        if problem:
            logger.warning("feature cache %s is corrupt (%s); re-extracting", entry, problem)
            shutil.rmtree(entry)
    hit = _broadcast_flag(dist_info.is_main and entry.exists() and not problem, dist_info)
    if not hit:
        partial = cache_dir / f".{key}.partial"
        if dist_info.is_main and partial.exists():
            shutil.rmtree(partial)
        start = time.time()
        logger.info("extracting %s features of %d images from %s", layers, len(dataset),
                    dataset.root)  # fmt: skip
        encoder = make_encoder()
        extract_to(encoder, dataset, partial, layers, dist_info, batch_size, num_workers,
                   use_bfloat16)  # fmt: skip
        if dist_info.is_main:
            meta = {"key": key, **parts, "extract_seconds": round(time.time() - start, 3)}
            for name in ("features", "labels"):
                path = partial / f"{name}.npy"
                meta[f"{name}_shape"] = list(np.load(path, mmap_mode="r").shape)
                meta[f"{name}_sha256"] = file_sha256(path)
            write_json_atomic(meta, partial / "meta.json")
            os.replace(partial, entry)
        barrier()
    else:
        logger.info("reusing cached features %s", entry)
    feats = np.load(entry / "features.npy", mmap_mode="r")
    labels = np.load(entry / "labels.npy")
    readable = labels >= 0
    if not readable.any():
        raise ValueError(f"{dataset.root}: none of the {len(labels)} images could be read")
    if not readable.all():
        logger.warning("%s: %d unreadable images left out", dataset.root, int((~readable).sum()))
        feats, labels = np.asarray(feats[readable]), labels[readable]
    return FeatureSet(feats, labels, list(dataset.classes), entry, reused=hit)
