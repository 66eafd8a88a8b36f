"""Atomic ``torch.save`` (``save_checkpoint``) through the one atomic writer, ``io.atomic``.

Temporary files left by killed writes (``.<name>.<random>.tmp``) are removed by a later save of
the same path only once they are stale: not modified for ``STALE_TEMP_AGE_S``. A temp file that
is younger may belong to a writer still at work (temp names are unique per writer, so concurrent
writers of one path are allowed), and deleting it would make that writer fail.

Every file written here gets ``<file>.sha256`` (``sha256sum`` format), hashed from the bytes as
they are written; ``io.read.read_raw`` verifies it. The old sidecar is removed before the new
file is renamed into place and the new one written after, so a crash in between leaves a file
without a sidecar (not verified), never a file with another file's hash.
"""

from __future__ import annotations

import glob
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from .atomic import PathLike, atomic_write, write_text
from .read import SHA256_SUFFIX, file_sha256

STALE_TEMP_AGE_S = 6 * 3600.0  # a live writer touches its temp file continuously


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically: a crash leaves the old file or the new one.

    A failed write (disk full, quota) raises ``errors.WriteError`` naming the file; the previous
    file is unchanged and the temporary file removed.
    """
    remove_stale_temps(path)
    with atomic_write(path, "checkpoint") as tmp, open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            # torch.save reports a failed write as an opaque RuntimeError: raise the OSError
            # behind it, which atomic_write turns into a WriteError naming the file
            if writer.error is not None:
                raise writer.error from e
            raise
        sidecar(path).unlink(missing_ok=True)
    _write_sidecar(path, writer.digest.hexdigest())


def record_sha256(path: PathLike) -> Path:
    """Write ``<path>.sha256`` for a file just written by other means (e.g. safetensors)."""
    return _write_sidecar(path, file_sha256(path))


def sidecar(path: PathLike) -> Path:
    """``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + SHA256_SUFFIX)


def _write_sidecar(path: PathLike, hexdigest: str) -> Path:
    return write_text(f"{hexdigest}  {Path(path).name}\n", sidecar(path), "checksum")


def remove_stale_temps(path: PathLike, age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove ``path``'s temporary files not modified for ``age_s`` seconds; returns them."""
    path = Path(path)
    now, removed = time.time(), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # renamed or removed by its writer meanwhile
            pass
    return removed


class _RecordingWriter:
    """File proxy for ``torch.save`` that hashes what it writes (sequentially: torch's zip
    writer never seeks back) and remembers the first ``OSError`` of a write."""

    def __init__(self, f: Any):
        self.f, self.error, self.digest = f, None, hashlib.sha256()

    def write(self, data: bytes) -> int:
        try:
            self.digest.update(data)
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()
