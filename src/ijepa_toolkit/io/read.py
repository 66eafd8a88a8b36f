"""Safe reading of checkpoint files: ``torch.load(weights_only=True)`` or safetensors, nothing else.

No pickled code is ever run. Every file that cannot be used (missing, a folder, empty, truncated,
text, a zip without ``data.pkl``, pickled Python objects, a broken safetensors header) raises
``CheckpointError`` with one line that starts with the path.

Corruption: torch does not check the CRC-32 its zip records carry, so ``verify_records`` checks
the records a caller uses, on the memory-mapped bytes it is about to read anyway (a CPU pass over
page-cache pages, threaded: ``zlib.crc32`` releases the GIL). A file the toolkit wrote has a
``<file>.sha256`` beside it (``io/save.py``); ``read_raw`` then checks the whole file's SHA-256
first, and the records need no CRC pass.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Union

import torch

from ..errors import CheckpointError

PathLike = Union[str, os.PathLike]
SAFETENSORS_SUFFIXES = (".safetensors", ".st")
SHA256_SUFFIX = ".sha256"


@dataclass
class RawCheckpoint:
    """A file's content as read: ``obj`` is the saved dict (for safetensors: name -> tensor).

    ``sha256_verified``: the whole file matched the SHA-256 recorded when it was written.
    """

    path: Path
    container: Literal["torch", "safetensors"]
    obj: dict
    sha256_verified: bool = False


def read_raw(path: PathLike) -> RawCheckpoint:
    """Read ``path`` onto the CPU without executing any pickled code.

    safetensors files (by suffix or content) are read with safetensors; everything else with
    ``torch.load(weights_only=True)`` (memory-mapped when the file is a torch zip archive).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    kind, head = _sniff(path)
    verified = verify_sha256(path)
    if path.suffix in SAFETENSORS_SUFFIXES or kind == "safetensors":
        return RawCheckpoint(path, "safetensors", _read_safetensors(path), verified)
    try:
        mmap = kind == "zip" and zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as e:  # torch.load raises many types (KeyError on text files, ...)
        raise CheckpointError(_load_error_message(path, kind, head, e)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of state dicts, found {type(obj).__name__}")
    return RawCheckpoint(path, "torch", obj, verified)


def read_checkpoint(path: PathLike) -> dict:
    """The saved dict of a checkpoint file (see ``read_raw``), every record verified; for
    resuming training state."""
    raw = read_raw(path)
    verify_records(raw, (t for _, t in _tensors(raw.obj, "")))
    return raw.obj


def file_sha256(path: PathLike, chunk: int = 8 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path) -> bool:
    """Check ``path`` against ``<path>.sha256`` when it exists; ``CheckpointError`` naming the
    first bad zip record (or saying none is) when it differs. True when checked."""
    sidecar = path.with_name(path.name + SHA256_SUFFIX)
    try:
        recorded = sidecar.read_text().split()[0].lower()
    except (FileNotFoundError, IndexError):
        return False
    if file_sha256(path) == recorded:
        return True
    bad = _first_bad_record(path)
    where = f"record '{bad}' fails its CRC-32" if bad else "no zip record names the damage"
    raise CheckpointError(
        f"{path}: corrupt: its SHA-256 differs from the one recorded in {sidecar.name} when it "
        f"was written ({where}); restore the file, or delete {sidecar.name} if it was replaced "
        "on purpose"
    )


def _first_bad_record(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() or ""
    except (OSError, zipfile.BadZipFile, zlib.error):
        return ""


def verify_records(raw: RawCheckpoint, used: Iterable[torch.Tensor]) -> int:
    """CRC-32 check of the zip records behind the tensors ``used`` and behind every tensor of
    the top-level entries holding them (conversions may derive ``used`` from their siblings).

    Returns the number of records checked (0: not a memory-mapped zip, or the whole file was
    already checked by its SHA-256). ``CheckpointError`` names the file, record and tensor.
    """
    if raw.container != "torch" or raw.sha256_verified or not zipfile.is_zipfile(raw.path):
        return 0
    wanted = {_ptr(t) for t in used}
    picked = [
        key for key, value in raw.obj.items()
        if any(_ptr(t) in wanted for _, t in _tensors(value, str(key)))
    ]  # fmt: skip
    meta = torch.load(raw.path, map_location="meta", weights_only=True)
    records, checks = _data_records(raw.path), {}
    for key in picked:
        pairs = zip(_tensors(raw.obj[key], str(key)), _tensors(meta[key], str(key)))
        for (name, real), (_, fake) in pairs:
            storage = real.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in checks:
                info = records.get(fake.untyped_storage()._checkpoint_offset)
                if info is None:
                    raise CheckpointError(f"{raw.path}: tensor '{name}' has no zip record")
                checks[storage.data_ptr()] = (name, info, storage)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for name, info, crc in pool.map(_crc_of, checks.values()):
            if crc != info.CRC:
                raise CheckpointError(
                    f"{raw.path}: corrupt: record '{info.filename}' (tensor '{name}') fails its "
                    f"CRC-32 check (stored {info.CRC:08x}, read {crc:08x})"
                )
    return len(checks)


def _crc_of(check: tuple) -> tuple:
    name, info, storage = check
    data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
    return name, info, zlib.crc32(data)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` of every tensor in nested dicts / lists, in a fixed order."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _data_records(path: Path) -> dict:
    """Offset of each stored record's bytes in the file -> its ``ZipInfo``."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            out[info.header_offset + 30 + name_len + extra_len] = info
    return out


def _sniff(path: Path) -> tuple[str, bytes]:
    """``zip`` (torch.save), ``pickle`` (legacy torch.save), ``safetensors`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip", head
    if head[:1] == b"\x80":  # pickle PROTO opcode: torch.save(_use_new_zipfile_serialization=False)
        return "pickle", head
    if len(head) > 8 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len <= path.stat().st_size:
            return "safetensors", head
    return "unknown", head


def _first_sentence(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line.split(". ")[0].rstrip(".")[:limit]


def _load_error_message(path: Path, kind: str, head: bytes, err: Exception) -> str:
    """One line for a ``torch.load`` failure: refused pickle, corrupt file or not a checkpoint."""
    text = str(err)
    globals_ = re.findall(r"GLOBAL ([\w.]+)", text)
    if globals_:
        names = ", ".join(dict.fromkeys(globals_))
        return (
            f"{path}: refused: the file holds pickled Python objects ({names}) that could run "
            "code when loaded; only tensors and plain containers are read (weights_only=True)"
        )
    if kind == "zip" and zipfile.is_zipfile(path) and not _zip_has_pickle(path):
        return (
            f"{path}: not a PyTorch checkpoint (a zip archive without the data.pkl of torch.save)"
        )
    if kind in ("zip", "pickle"):
        if isinstance(err, pickle.UnpicklingError) and "truncated" not in text:
            return (
                f"{path}: refused: pickle data that torch.load(weights_only=True) cannot read "
                f"safely ({_unpickling_detail(text)}); expected a checkpoint written by torch.save"
            )
        detail = _first_sentence(text) or type(err).__name__
        return f"{path}: truncated or corrupt checkpoint, cannot be read ({detail})"
    return (
        f"{path}: not a PyTorch checkpoint or safetensors file "
        f"(unrecognised content starting with {head[:8]!r})"
    )


def _zip_has_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _unpickling_detail(text: str) -> str:
    """The informative line of a ``weights_only`` ``UnpicklingError`` (torch's advice dropped)."""
    boilerplate = ("weights only load failed", "please file an issue", "check the documentation")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.lower().startswith(boilerplate) and "(1)" not in ln]
    detail = useful[0] if useful else (lines[0] if lines else "unreadable")
    return detail.removeprefix("WeightsUnpickler error:").strip()[:160]


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
