"""Frozen features, extracted once and cached on disk; every frozen-feature protocol reads them.

Layer specs: ``last`` is the mean of the final-norm tokens (the official pooling), (N, D);
``concat4`` the last 4 blocks, each through the final norm and averaged over tokens,
concatenated (the VISSL protocol of the I-JEPA paper), (N, 4*D).

The cache key is a SHA-256 of everything that changes the numbers: the checkpoint content (or
arch + seed for a random init), the sub-model and loading options, the layer spec, the
transform's ``repr``, the effective precision and the device type, ``FEATURE_CODE_VERSION`` and
the dataset listing (class names; relative path, class and content stamp of every image: size
and mtime under the resolved folder, or with ``features.hash_images`` a SHA-256 of each file).
The on-disk layout (entries, per-key lock, chunked resumable partials) is ``eval/cache.py``.
Under torchrun the ranks of one job split the chunks of one entry between them.

torch, torchvision and the model code are imported when extraction starts, not with this module
(the protocols' ``--help`` and config checks do not import them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Iterator,
    Literal,
    Optional,
    Sequence,
    Union,
)

import numpy as np

from ..config import EncoderSection
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, transform_checks
from ..engine.distributed import DistInfo, all_reduce_sum, barrier
from ..engine.utils import (
    amp_dtype,
    autocast,
    loader_kwargs,
    maybe_compile,
    precision_name,
    progress,
)
from ..errors import ConfigError, UserError
from .cache import (
    EntryLock,
    PartialEntry,
    checkpoint_digest,
    chunk_bounds,
    chunk_rows,
    discard_entry,
    open_entry,
)

if TYPE_CHECKING:
    import torch

    from ..data.folder import SafeImageFolder

logger = logging.getLogger("ijepa_toolkit")

LAYERS = {"last": "avg", "concat4": "concat4"}  # layer spec -> models.heads pooling
FEATURE_CODE_VERSION = 2  # bump when a change to the feature code changes the numbers
POLL_S = 0.5  # seconds between attempts at another writer's lock


@dataclass
class EvalDataSection:
    """Image folders (``class/image`` layout) and the evaluation transform.

    Default transform: resize the short side to 256 (bicubic), center-crop 224, ImageNet mean/std.
    """

    train_folder: str = ""
    val_folder: str = ""
    img_size: int = 224
    crop_ratio: float = 0.875  # resize to img_size / crop_ratio before the center crop
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # of that resize
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD))
    batch_size: int = 128  # images per extraction batch, per rank
    num_workers: int = 4

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        return [
            *transform_checks(self.img_size, self.crop_ratio),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0"),
        ]


@dataclass
class FeaturesSection:
    """Which features and where they are cached."""

    layers: Literal["last", "concat4"] = "last"  # see the module docstring
    cache_dir: str = "cache/features"
    verify: Literal["size", "full"] = "size"  # reuse check: O(1) headers and sizes, or re-hash all
    hash_images: bool = False  # key images by a SHA-256 of their bytes, not their size and mtime
    compile: bool = False  # torch.compile the extraction forward (part of the cache key)
    gpu_decode: bool = False  # CUDA only: decode JPEGs + resize on the GPU (data/device_decode.py)


@dataclass
class FeatureSet:
    """Features of the readable images of a split: ``feats`` (N, D) float32, ``labels`` (N,).

    ``path``: the cache entry they were read from (None when computed in memory)."""

    feats: np.ndarray
    labels: np.ndarray
    classes: list[str]
    path: Optional[Path] = None
    reused: bool = False


def model_identity(
    model: EncoderSection, seed: int, cache_dir: Union[str, Path], remember: bool = True
) -> dict:
    """What determines the encoder's weights: checkpoint content + options, or arch + seed."""
    opts = {"num_heads": model.num_heads, "pos_embed": model.pos_embed}
    if model.checkpoint:
        digest = checkpoint_digest(model.checkpoint, cache_dir, remember)
        return {"checkpoint_sha256": digest, "which": model.which, **opts}
    return {"random_init": model.arch, "seed": seed, **opts}


def dataset_listing(dataset: SafeImageFolder, hash_images: bool = False) -> dict:
    """Class names and a SHA-256 of the (relative path, class, content stamp) of every sample.

    The stamp is the file's size and mtime (ns), and the resolved folder is part of the listing
    (another folder with the same names and sizes is another listing); with ``hash_images`` it
    is a SHA-256 of the file's bytes and the folder's location does not matter."""
    from ..io.read import file_sha256

    h = hashlib.sha256()
    for path, target in dataset.samples:
        try:
            stamp = file_sha256(path) if hash_images else _size_mtime(path)
        except OSError:
            stamp = "unreadable"
        h.update(f"{os.path.relpath(path, dataset.root)}\t{target}\t{stamp}\n".encode())
    listing = {
        "classes": list(dataset.classes),
        "num_samples": len(dataset),
        "stamps": "sha256" if hash_images else "size+mtime",
        "files": h.hexdigest(),
    }
    if not hash_images:
        listing["root"] = str(Path(dataset.root).resolve())
    return listing


def _size_mtime(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}\t{st.st_mtime_ns}"


def device_decode_dataset(dataset: SafeImageFolder, data: EvalDataSection) -> Any:
    """``dataset``'s images as encoded bytes, decoded and transformed on the device that
    extracts (``features.gpu_decode``, ``data/device_decode.py``)."""
    from ..data.device_decode import DeviceTransform, JpegFolder

    tf = DeviceTransform(data.img_size, data.crop_ratio, tuple(data.mean), tuple(data.std),
                         data.interpolation)  # fmt: skip
    return JpegFolder(dataset, tf)


def build_eval_dataset(
    folder: str, data: EvalDataSection, indices: Optional[Sequence[int]] = None
) -> SafeImageFolder:
    """A ``SafeImageFolder`` with the evaluation transform, optionally restricted to ``indices``."""
    from ..data.folder import SafeImageFolder

    if not folder:
        raise ConfigError("image folder not set: give data.train_folder and data.val_folder")
    tf = eval_transform(data.img_size, data.crop_ratio, data.mean, data.std, data.interpolation)
    ds = SafeImageFolder(folder, transform=tf)
    if indices is not None:
        ds.samples = [ds.samples[i] for i in indices]
        ds.imgs = ds.samples
        ds.targets = [t for _, t in ds.samples]
    return ds


def cache_key(
    identity: dict,
    layers: str,
    dataset: SafeImageFolder,
    device: Optional[torch.device] = None,
    use_bfloat16: bool = True,
    hash_images: bool = False,
    compiled: bool = False,
) -> tuple[str, dict]:
    """(hex key, its parts) for features of ``dataset`` through the encoder ``identity``.

    ``device`` (default the CPU): its type and the precision extraction computes in there
    (``engine.utils.amp_dtype``) are part of the key; so is ``compiled`` when true."""
    import torch

    device = device or torch.device("cpu")
    parts = {
        "version": FEATURE_CODE_VERSION,
        "model": identity,
        "layers": layers,
        "transform": repr(dataset.transform),
        "precision": precision_name(amp_dtype(device, use_bfloat16)),
        "device": device.type,
        "dataset": dataset_listing(dataset, hash_images),
    }
    if compiled:
        parts["compiled"] = True
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32], parts


class _Indexed:
    """Items ``(image, target, index)`` of ``dataset`` at ``indices``; ``None`` if unreadable
    (a map-style dataset for ``DataLoader``)."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        item = self.dataset[j]
        return None if item is None else (item[0], item[1], j)


def _broadcast(value: int, dist_info: DistInfo) -> int:
    """Rank 0's ``value`` on every rank."""
    import torch

    t = torch.tensor([value if dist_info.is_main else 0], device=dist_info.device)
    return int(all_reduce_sum(t).item())


def feature_batches(
    encoder: torch.nn.Module,
    loader: Iterable,
    layers: str,
    device: torch.device,
    use_bfloat16: bool = True,
    compile: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(indices, (B, D) float32 features, (B,) targets)`` of each readable batch of ``loader``
    (batches of ``(images, targets, indices)``, ``None`` when nothing was readable);
    ``compile``: the pooled forward through ``torch.compile``."""
    from ..models.heads import pooled_features

    encoder = encoder.to(device).eval()
    pool = maybe_compile(functools.partial(pooled_features, encoder, pool=LAYERS[layers]), compile)
    for batch in loader:
        if batch is None:
            continue
        images, targets, index = batch
        with autocast(device, use_bfloat16):
            out = pool(images.to(device, non_blocking=True))
        yield index.numpy(), out.float().cpu().numpy(), targets.numpy()


def _batch_images(batch: Optional[tuple]) -> int:
    """The images of a collated ``(images, labels, indices)`` batch (0 for a skipped one)."""
    return 0 if batch is None else len(batch[-1])


def encode_folder(
    encoder: torch.nn.Module,
    folder: str,
    data: Optional[EvalDataSection] = None,
    layers: str = "last",
    device: Optional[torch.device] = None,
    use_bfloat16: bool = True,
) -> FeatureSet:
    """Features of the readable images of ``folder`` in memory, no cache (a Python caller's
    encoder): ``data`` gives the evaluation transform and batch size. The global RNG is left
    untouched, so a probe inside a training run does not change that run."""
    import torch
    from torch.utils.data import DataLoader

    from ..data.folder import collate_skip_none

    data = data or EvalDataSection()
    dataset = build_eval_dataset(folder, data)
    device = device or next(encoder.parameters()).device
    loader = DataLoader(
        _Indexed(dataset, range(len(dataset))), batch_size=data.batch_size,
        collate_fn=getattr(dataset, "collate", collate_skip_none), generator=torch.Generator(),
        **loader_kwargs(data.num_workers, device),
    )  # fmt: skip
    bar = progress(loader, f"features {folder}", len(dataset), unit="img", size=_batch_images)
    with torch.inference_mode():
        parts = list(feature_batches(encoder, bar, layers, device, use_bfloat16))
    if not parts:
        raise UserError(f"{folder}: none of the {len(dataset)} images could be read")
    order = np.argsort(np.concatenate([p[0] for p in parts]))
    feats = np.concatenate([p[1] for p in parts])[order]
    return FeatureSet(feats, np.concatenate([p[2] for p in parts])[order], list(dataset.classes))


def extract_to(
    encoder: torch.nn.Module,
    dataset: Any,
    folder: Path,
    layers: str,
    dist_info: DistInfo,
    batch_size: int = 128,
    num_workers: int = 0,
    use_bfloat16: bool = True,
    chunk: Optional[int] = None,
    key: str = "",
    compile: bool = False,
) -> None:
    """Write pooled features of ``dataset`` into the partial entry ``folder`` (``cache.py``),
    chunk by chunk, skipping the chunks a killed earlier run already recorded.

    Every rank calls this; the unfinished chunks are dealt round-robin to the ranks, each chunk
    split into the same batches whatever the world size (bf16 autocast on CUDA). ``chunk``: rows
    per chunk, a multiple of ``batch_size`` (default about ``cache.CHUNK_BYTES`` of features).
    ``compile``: ``torch.compile`` the encoder first.
    """
    import torch

    with torch.inference_mode():
        _extract_chunks(encoder, dataset, PartialEntry(folder, key), layers, dist_info,
                        batch_size, num_workers, use_bfloat16, chunk, compile)  # fmt: skip


def _extract_chunks(
    encoder: torch.nn.Module,
    dataset: Any,
    partial: PartialEntry,
    layers: str,
    dist_info: DistInfo,
    batch_size: int,
    num_workers: int,
    use_bfloat16: bool,
    chunk: Optional[int],
    compile: bool,
) -> None:
    """``extract_to``'s work (under ``torch.inference_mode``)."""
    from torch.utils.data import DataLoader

    from ..data.folder import collate_skip_none
    from ..models.heads import feature_dim

    n, dim = len(dataset), feature_dim(encoder, LAYERS[layers])
    if dist_info.is_main:
        partial.prepare(n, dim, chunk or chunk_rows(dim, batch_size))
    barrier()
    plan, done = partial.plan(), partial.done()
    barrier()  # every rank has read the same finished chunks before anyone records more
    bounds = chunk_bounds(n, plan["chunk"])
    todo = [i for i in range(len(bounds)) if i not in done]
    if dist_info.is_main and done:
        logger.info("resuming %s: %d of %d chunks already written", partial.folder, len(done),
                    len(bounds))  # fmt: skip
    mine = todo[dist_info.rank :: dist_info.world_size]
    batches = [list(range(s, min(s + batch_size, bounds[i][1])))
               for i in mine for s in range(bounds[i][0], bounds[i][1], batch_size)]  # fmt: skip
    loader = DataLoader(
        _Indexed(dataset, range(n)), batch_sampler=batches,
        collate_fn=getattr(dataset, "collate", collate_skip_none),
        **loader_kwargs(num_workers, dist_info.device),
    )  # fmt: skip
    bar = progress(loader, f"features {layers}", sum(bounds[i][1] - bounds[i][0] for i in mine),
                   dist_info.is_main, "img", size=_batch_images)  # fmt: skip
    out = feature_batches(encoder, bar, layers, dist_info.device, use_bfloat16, compile)
    _write_chunks(partial, plan, [(i, *bounds[i]) for i in mine], out)
    barrier()


def _write_chunks(
    partial: PartialEntry,
    plan: dict,
    chunks: Sequence[tuple[int, int, int]],
    batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Fill each ``(chunk, start, stop)`` from ``batches`` (in chunk order; the batches of an
    unreadable chunk are missing, its labels stay -1) and record it."""
    pending = next(batches, None)
    for i, start, stop in chunks:
        feats = np.zeros((stop - start, plan["dim"]), np.float32)
        labels = np.full(stop - start, -1, np.int64)
        while pending is not None and pending[0][0] < stop:
            index, f, t = pending
            feats[index - start], labels[index - start] = f, t
            pending = next(batches, None)
        partial.write_chunk(plan, i, feats, labels)


def _claim(
    entry: Path, lock: EntryLock, full: bool, dist_info: DistInfo
) -> tuple[bool, Optional[tuple]]:
    """Wait for the key's lock (rank 0; all ranks poll together so no collective times out).
    ``(True, None)``: this job holds the lock and must extract; ``(False, arrays)``: another
    writer published a sound entry meanwhile (arrays on rank 0), the lock is released."""
    arrays, waited = None, False
    while True:
        state = 0  # 0: wait, 1: reuse, 2: extract
        if dist_info.is_main and lock.try_acquire():
            found = entry.exists()
            arrays, problem = open_entry(entry, entry.name, full) if found else (None, None)
            if arrays is not None:
                lock.release()
            elif problem:
                logger.warning("feature cache %s is corrupt (%s); re-extracting", entry, problem)
                discard_entry(entry)
            state = 1 if arrays is not None else 2
        elif dist_info.is_main and not waited:
            logger.info("waiting for another process writing %s", entry)
            waited = True
        state = _broadcast(state, dist_info)
        if state:
            return state == 2, arrays
        if dist_info.is_main:
            time.sleep(POLL_S)


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
    verify: str = "size",
    hash_images: bool = False,
    chunk: Optional[int] = None,
    compile: bool = False,
) -> FeatureSet:
    """Features of ``dataset`` from the cache, extracting (with ``make_encoder()``) on a miss.

    Safe with any number of concurrent processes on one key: one writer at a time (a per-key
    lock), the others wait and reuse its entry; a killed writer's chunks are resumed by the next.
    A corrupt entry is re-extracted with a warning (``verify="full"`` re-hashes every chunk).
    Every rank must call this. ``compile``: ``torch.compile`` the encoder (``features.compile``).
    """
    key, parts = cache_key(identity, layers, dataset, dist_info.device, use_bfloat16, hash_images,
                           compile)  # fmt: skip
    cache_dir, full = Path(cache_dir), verify == "full"
    entry = cache_dir / key
    arrays = open_entry(entry, key, full)[0] if dist_info.is_main and entry.exists() else None
    reused = bool(_broadcast(int(arrays is not None), dist_info))
    if not reused:
        lock = EntryLock(cache_dir, key)
        must_extract, arrays = _claim(entry, lock, full, dist_info)
        reused = not must_extract
        if must_extract:
            try:
                _extract_entry(dataset, make_encoder, layers, entry, parts, dist_info, batch_size,
                               num_workers, use_bfloat16, chunk, compile)  # fmt: skip
            finally:
                lock.release()
            arrays = None
    if reused:
        logger.info("reusing cached features %s", entry)
    if arrays is None:
        arrays, problem = open_entry(entry, key)
        if arrays is None:
            raise UserError(f"feature cache {entry}: {problem}")
    return _readable(dataset, entry, *arrays, reused)


def _extract_entry(
    dataset: SafeImageFolder,
    make_encoder: Callable[[], torch.nn.Module],
    layers: str,
    entry: Path,
    parts: dict,
    dist_info: DistInfo,
    batch_size: int,
    num_workers: int,
    use_bfloat16: bool,
    chunk: Optional[int],
    compile: bool = False,
) -> None:
    """Extract (or finish) the partial entry of ``entry`` on every rank; rank 0 publishes it."""
    start = time.time()
    logger.info("extracting %s features of %d images from %s", layers, len(dataset), dataset.root)
    partial = PartialEntry.of(entry.parent, entry.name)
    extract_to(make_encoder(), dataset, partial.folder, layers, dist_info, batch_size,
               num_workers, use_bfloat16, chunk, entry.name, compile)  # fmt: skip
    if dist_info.is_main:
        partial.publish(entry, {**parts, "extract_seconds": round(time.time() - start, 3)})
    barrier()


def _readable(
    dataset: SafeImageFolder, entry: Path, feats: np.ndarray, labels: np.ndarray, reused: bool
) -> FeatureSet:
    """The entry's readable rows (labels >= 0) as a ``FeatureSet``; an error if there are none."""
    labels = np.array(labels)  # (N,) int64 in memory; the features stay memory-mapped
    readable = labels >= 0
    if not readable.any():
        raise UserError(f"{dataset.root}: none of the {len(labels)} images could be read")
    if not readable.all():
        logger.warning("%s: %d unreadable images left out", dataset.root, int((~readable).sum()))
        feats, labels = np.asarray(feats[readable]), labels[readable]
    return FeatureSet(feats, labels, list(dataset.classes), entry, reused=reused)
