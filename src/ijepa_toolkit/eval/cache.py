"""On-disk side of the frozen-feature cache: entries, the per-key lock, chunked partial entries.

Layout of ``<cache_dir>``:

- ``<key>/``: a published entry, never modified after its rename into place: ``features.npy``
  (N, D) float32, ``labels.npy`` (N,) int64 (-1: unreadable image), ``meta.json`` (the key's
  parts, shapes, byte sizes and the SHA-256 of every chunk, computed while writing).
- ``.<key>.lock``: an ``fcntl.flock`` held by the one process (rank 0 of a job) writing the key;
  the kernel releases it when that process dies, so a dead writer never blocks anyone.
- ``.<key>.partial/``: the entry being written, only ever touched by the lock holder's job: the
  two arrays preallocated at full size (``posix_fallocate``: a full disk is an error before any
  feature is computed, never a SIGBUS), ``plan.json`` and ``chunks/<i>.done`` (written after
  chunk ``i``'s bytes are fsynced; holds their SHA-256). The next lock holder resumes from it.
- ``checkpoint_digests.json``: SHA-256 of checkpoints by (path, size, mtime), best effort.

Reuse costs O(1): ``meta.json``, the two ``.npy`` headers (dtype, shape) and the file sizes
(truncation or appended bytes); ``full=True`` re-hashes every chunk against ``meta.json``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import CheckpointError, WriteError
from ..io.atomic import fsync, write_json, write_text

logger = logging.getLogger("ijepa_toolkit")

LAYOUT_VERSION = 2  # bump when the files of an entry change meaning
CHUNK_BYTES = 64 << 20  # features per chunk (rounded to whole batches)
ARRAYS = {"features": np.float32, "labels": np.int64}
PathLike = Union[str, os.PathLike]


def checkpoint_digest(path: PathLike, cache_dir: PathLike, remember: bool = True) -> str:
    """SHA-256 of a checkpoint file, remembered by (path, size, mtime) so huge files hash once.

    ``remember=False`` reads the memo but does not write it (ranks other than 0). The memo is
    best effort: concurrent writers each publish a whole file (unique temp names), a read-only
    cache folder keeps the digest in memory only."""
    path = Path(path).resolve()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    st = path.stat()
    memo_path = Path(cache_dir) / "checkpoint_digests.json"
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    digest = _read_memo(memo_path).get(stamp)
    if digest is None:
        from ..io.read import file_sha256  # (io.read imports torch)

        digest = file_sha256(path)
        if remember:
            try:  # merge with what other writers added since our read
                write_json({**_read_memo(memo_path), stamp: digest}, memo_path)
            except OSError as e:
                logger.info("checkpoint digest not remembered in %s (%s)", memo_path, e)
    return digest


def _read_memo(memo_path: Path) -> dict:
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


class EntryLock:
    """The exclusive ``flock`` of one key: ``.<key>.lock`` in the cache folder."""

    def __init__(self, cache_dir: Path, key: str):
        self.path = cache_dir / f".{key}.lock"
        self.fd: Optional[int] = None

    def try_acquire(self) -> bool:
        """True if this process now holds the lock; False if another process holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WriteError(self.path, e, "feature cache lock (is the cache read-only?)") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every chunk of ``n`` rows."""
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def chunk_rows(dim: int, batch_size: int, max_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: whole batches, about ``max_bytes`` of float32 features, at least 1 batch."""
    return batch_size * max(1, max_bytes // (batch_size * dim * 4))


def _create_array(path: Path, dtype: type, shape: tuple[int, ...]) -> int:
    """A ``.npy`` file of ``shape``, all its bytes allocated on disk; returns the data offset."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}  # fmt: skip
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.flush()
        offset = f.tell()
        size = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(f.fileno(), size)  # no preallocation on this filesystem
    return offset


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class PartialEntry:
    """``.<key>.partial``: written in chunks by every rank of the lock holder's job."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key
        self.chunks = self.folder / "chunks"

    @classmethod
    def of(cls, cache_dir: Path, key: str) -> PartialEntry:
        return cls(cache_dir / f".{key}.partial", key)

    def prepare(self, n: int, dim: int, chunk: int) -> dict:
        """Main rank, under the lock: keep a dead writer's partial of the same key and shape
        (resume, with its chunk size), else start a new one with both arrays preallocated.
        Returns the plan."""
        plan = {"key": self.key, "layout": LAYOUT_VERSION, "n": n, "dim": dim}
        old = self.plan()
        if old is not None and {k: old.get(k) for k in plan} == plan:
            return old
        plan["chunk"] = chunk
        shutil.rmtree(self.folder, ignore_errors=True)
        need = n * dim * 4 + n * 8
        try:
            self.chunks.mkdir(parents=True)
            plan["offsets"] = {
                "features": _create_array(self.folder / "features.npy", np.float32, (n, dim)),
                "labels": _create_array(self.folder / "labels.npy", np.int64, (n,)),
            }
        except OSError as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            what = f"feature cache entry ({need} bytes = {need / 2**30:.2f} GiB needed)"
            raise WriteError(self.folder, e, what) from e
        write_json(plan, self.folder / "plan.json", "feature cache plan")
        return plan

    def plan(self) -> Optional[dict]:
        try:
            return json.loads((self.folder / "plan.json").read_text())
        except (OSError, ValueError):
            return None

    def done(self) -> dict[int, str]:
        """``{chunk: sha256}`` of the chunks recorded as finished."""
        out = {}
        for p in self.chunks.glob("[0-9]*.done"):
            out[int(p.name.split(".")[0])] = p.read_text().strip()
        return out

    def write_chunk(self, plan: dict, i: int, feats: np.ndarray, labels: np.ndarray) -> None:
        """Write chunk ``i`` (``(rows, D)`` float32, ``(rows,)`` int64) and record it finished."""
        start = i * plan["chunk"]
        h = hashlib.sha256()
        for name, arr in (("features", feats), ("labels", labels)):
            data = np.ascontiguousarray(arr, dtype=ARRAYS[name]).tobytes()
            row = len(data) // len(arr)
            path = self.folder / f"{name}.npy"
            fd = os.open(path, os.O_WRONLY)
            try:
                _pwrite_all(fd, data, plan["offsets"][name] + start * row)
                os.fsync(fd)
            except OSError as e:
                raise WriteError(path, e, "feature cache chunk") from e
            finally:
                os.close(fd)
            h.update(data)
        write_text(h.hexdigest(), self.chunks / f"{i}.done", "feature cache chunk record")

    def publish(self, entry: Path, meta: dict) -> None:
        """Main rank, all chunks done: ``meta.json``, then the atomic rename to ``entry``."""
        plan = self.plan()
        done = self.done()
        n_chunks = len(chunk_bounds(plan["n"], plan["chunk"]))
        missing = sorted(set(range(n_chunks)) - set(done))
        if missing:
            raise RuntimeError(f"{self.folder}: chunks {missing[:5]} were not written")
        meta = {**meta, "key": self.key, "layout": LAYOUT_VERSION, "chunk": plan["chunk"],
                "chunk_sha256": [done[i] for i in range(n_chunks)]}  # fmt: skip
        for name in ARRAYS:
            shape = [plan["n"], plan["dim"]] if name == "features" else [plan["n"]]
            meta[f"{name}_shape"] = shape
            meta[f"{name}_bytes"] = (self.folder / f"{name}.npy").stat().st_size
        write_json(meta, self.folder / "meta.json", "feature cache meta.json")
        os.replace(self.folder, entry)
        fsync(entry.parent)
        shutil.rmtree(entry / "chunks", ignore_errors=True)
        (entry / "plan.json").unlink(missing_ok=True)


def open_entry(entry: Path, key: str, full: bool = False) -> tuple[Optional[tuple], Optional[str]]:
    """``((features (N, D), labels (N,)) memmaps, None)`` for a sound entry of ``key``, else
    ``(None, what is wrong)``. O(1) checks; ``full`` also re-hashes every chunk."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return None, f"meta.json unreadable ({e})"
    if meta.get("key") != key or meta.get("layout") != LAYOUT_VERSION:
        return None, f"meta.json names key {meta.get('key')!r}, layout {meta.get('layout')!r}"
    arrays = []
    for name, dtype in ARRAYS.items():
        path = entry / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")  # allow_pickle=False: a pickle is an error
            size = path.stat().st_size
        except (OSError, ValueError) as e:
            return None, f"{path.name} unreadable ({e})"
        if arr.dtype != dtype or list(arr.shape) != meta.get(f"{name}_shape"):
            want = f"{np.dtype(dtype)} {meta.get(f'{name}_shape')}"
            return None, f"{path.name} is {arr.dtype} {list(arr.shape)}, not {want}"
        if size != meta.get(f"{name}_bytes"):
            return None, f"{path.name} has {size} bytes, not {meta.get(f'{name}_bytes')}"
        arrays.append(arr)
    if full and (problem := _check_chunks(*arrays, meta)):
        return None, problem
    return (arrays[0], arrays[1]), None


def _check_chunks(feats: np.ndarray, labels: np.ndarray, meta: dict) -> Optional[str]:
    expected = meta.get("chunk_sha256", [])
    bounds = chunk_bounds(len(labels), int(meta.get("chunk", 1)))
    if len(expected) != len(bounds):
        return f"meta.json records {len(expected)} chunks, the arrays hold {len(bounds)}"
    for i, (a, b) in enumerate(bounds):
        h = hashlib.sha256(np.ascontiguousarray(feats[a:b]).tobytes())
        h.update(np.ascontiguousarray(labels[a:b]).tobytes())
        if h.hexdigest() != expected[i]:
            return f"chunk {i} (rows {a}-{b - 1}) does not match its checksum"
    return None


def discard_entry(entry: Path) -> None:
    """Move a corrupt entry aside (readers holding its files keep them), then delete it."""
    aside = entry.parent / f".{entry.name}.corrupt.{os.getpid()}"
    os.replace(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)
