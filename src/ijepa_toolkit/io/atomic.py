"""The one atomic-write helper: unique temp name beside the target, fsync, rename, fsync folder.

A crash at any moment leaves either the old file or the new one, never a partial file. Temp
names are unique per writer (``mkstemp``), so concurrent writers of one path never share a temp
file: the last rename wins and each published file is whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import yaml

from ..errors import WriteError

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_write(path: PathLike, what: str = "file") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; fsynced and renamed over ``path`` on success.

    On an exception the temporary file is removed; an ``OSError`` while writing (disk full,
    quota) becomes a ``WriteError`` naming ``path`` (``what`` says what it is in the message).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give a plain open's mode
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(path, e, what) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync(path.parent)


def write_text(text: str, path: PathLike, what: str = "file") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, what) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj: Any, path: PathLike, what: str = "file") -> Path:
    """Write ``obj`` as indented JSON (non-JSON values as ``str``) atomically."""
    return write_text(json.dumps(obj, indent=2, default=str) + "\n", path, what)


def write_yaml(obj: Any, path: PathLike, what: str = "file") -> Path:
    """Write ``obj`` as YAML (keys in insertion order) atomically."""
    return write_text(yaml.safe_dump(obj, sort_keys=False), path, what)


def fsync(path: PathLike) -> None:
    """Flush a written file's (or a folder's renames') data to disk; skipped where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
