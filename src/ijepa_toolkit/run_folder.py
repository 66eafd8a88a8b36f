"""Run folders owned by one run, and the stamps that say which inputs made a ``results.json``.

``open_run`` is the first thing a training entrypoint does, before it writes anything:

- it takes ``<folder>/.lock`` (``fcntl.flock``, held for the run's life, released when the
  process ends however it ends): a second run into the same folder at once is refused with one
  line naming the folder and the holder's pid;
- a new run into a folder holding another run's outputs (``OUTPUTS``) is refused, unless
  ``--resume`` (continue it) or ``--overwrite`` (delete those outputs first);
- ``--resume`` compares the saved ``config.yaml`` with the new config: a changed key that can
  alter what the run computes is refused, naming the keys; the keys of the entrypoint's
  allow-list (``ALWAYS_ALLOWED`` + its own: logging, checkpoint frequency, more epochs) may
  change, and the changes go into ``log.jsonl``'s ``resumed_at`` row (``RunFolder.resumed``).

Non-main DDP ranks (``RANK`` > 0) neither lock nor check: the main rank's refusal ends the job.

``run_inputs`` stamps what a run read (its config, the encoder checkpoint's path, size and
mtime, its data folders' listings); ``runs.write_results`` records it as ``inputs``, and
``stale_reason`` tells the demo and the tables whether a ``results.json`` still fits the run
they would start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import io
import json
import logging
import os
import shlex
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

import yaml

from .config import CONFIG_NAME, to_dict
from .errors import UserError

logger = logging.getLogger("ijepa_toolkit")
PathLike = Union[str, os.PathLike]
LOCK_NAME = ".lock"
LAST = "checkpoint-last.pth"
OUTPUTS = ("checkpoint-last.pth", "checkpoint-best.pth", "results.json", "log.jsonl")
# deleted by --overwrite besides OUTPUTS: what a run writes beside them
OVERWRITTEN = (*OUTPUTS, CONFIG_NAME, "tensorboard")
# keys a resume may change in every entrypoint: where and how often it logs, more epochs
ALWAYS_ALLOWED = ("logging.folder", "logging.write_tag", "logging.tensorboard",
                  "logging.log_freq", "data.pin_mem", "optimization.epochs")  # fmt: skip
NOT_CONFIG = ("logging.folder",)  # left out of the config digest: the folder is the run's name
MISSING = "(absent)"
# the linear probe's allow-list (eval/linear.py): the feature cache's place and verification
LINPROBE_RESUME_ALLOWED = (*ALWAYS_ALLOWED, "features.cache_dir", "features.verify")
T = TypeVar("T")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """``--resume`` and ``--overwrite``, the same two flags in every training entrypoint."""
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in logging.folder from its checkpoint-last.pth "
                        "(refused if settings that change the result differ)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the outputs of an earlier run in logging.folder first "
                        f"({', '.join(OVERWRITTEN)})")  # fmt: skip


@dataclasses.dataclass
class RunFolder:
    """A run folder this process owns (``open_run``); use as a context manager."""

    path: Path
    resume: bool
    start: Optional[Path]  # the checkpoint to continue from (--resume and it exists)
    changes: dict  # allowed keys changed since the saved config.yaml: key -> [old, new]
    lock_fd: Optional[int] = None

    def resumed(self, run_log: Any, step: int) -> None:
        """After a resume from ``step`` (-1: from scratch), mark it in ``log.jsonl``: the rows
        an earlier attempt logged after ``step`` are superseded (``engine.logger``)."""
        if self.resume:
            run_log.resumed_at(step, self.changes)

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor drops the flock
            self.lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def is_main_process() -> bool:
    """Rank 0 (or no launcher): ``RANK`` as torchrun sets it, before any process group."""
    return int(os.environ.get("RANK", "0")) == 0


def lock_folder(folder: PathLike) -> int:
    """Create ``folder`` and take ``folder/.lock``; returns its descriptor (close it to release).

    Refused (``UserError``) while another process holds it, naming that process's pid."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"{folder} is in use by another run (pid {holder}): wait for it to end, or use "
            "another logging.folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_run(folder: PathLike) -> RunFolder:
    """Only lock ``folder`` (main rank): for a run that reads another run's outputs, e.g. an
    evaluation of its checkpoint."""
    folder = Path(folder)
    return RunFolder(folder, False, None, {}, lock_folder(folder) if is_main_process() else None)


def open_run(
    folder: PathLike,
    cfg: Any,
    *,
    resume: bool,
    overwrite: bool = False,
    allowed: Sequence[str] = ALWAYS_ALLOWED,
    checkpoint: str = LAST,
    is_main: Optional[bool] = None,
) -> RunFolder:
    """Own ``folder`` for one run of the config dataclass ``cfg``: lock, check, clear.

    ``allowed``: glob patterns of the dotted keys a ``--resume`` may change. Raises
    ``UserError`` (one line) for a folder in use, another run's outputs without ``--resume`` /
    ``--overwrite``, or a resume with changed settings."""
    folder = Path(folder)
    if resume and overwrite:
        raise UserError("--resume continues the run in logging.folder, --overwrite deletes it: "
                        "pass one of them")  # fmt: skip
    start = folder / checkpoint if resume and (folder / checkpoint).is_file() else None
    if not (is_main_process() if is_main is None else is_main):
        return RunFolder(folder, resume, start, {})
    fd = lock_folder(folder)
    try:
        changes = check_folder(folder, to_dict(cfg), resume, overwrite, allowed,
                               to_dict(type(cfg)()))  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    if resume and start is None:
        logger.warning("--resume: no %s yet; starting from scratch", folder / checkpoint)
    if changes:
        logger.info("--resume with changed settings: %s", describe(changes))
    return RunFolder(folder, resume, start, changes, fd)


def run_owned(
    cfg: Any, args: argparse.Namespace, allowed: Sequence[str], work: Callable[[], T]
) -> T:
    """``work()`` while owning ``cfg.logging.folder`` (``open_run`` with ``args.resume`` /
    ``args.overwrite`` of ``add_run_flags``): for an entrypoint's ``main``."""
    with open_run(cfg.logging.folder, cfg, resume=args.resume, overwrite=args.overwrite,
                  allowed=allowed):  # fmt: skip
        return work()


def check_folder(
    folder: Path, config: dict, resume: bool, overwrite: bool, allowed: Sequence[str],
    defaults: Optional[dict] = None,
) -> dict:  # fmt: skip
    """The ownership checks of ``open_run`` (under the lock); returns the allowed changes."""
    if resume:
        return resume_changes(folder, config, allowed, defaults)
    found = [name for name in OUTPUTS if (folder / name).exists()]
    if found and not overwrite:
        raise UserError(
            f"{folder} holds the outputs of another run ({', '.join(found)}): pass --resume to "
            "continue it, --overwrite to replace it, or use a new logging.folder"
        )
    if overwrite:
        for name in OVERWRITTEN:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return {}


def flatten(tree: Any, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: dict, new: dict) -> dict:
    """``{key: [saved value, new value]}`` of every dotted key that differs (``(absent)``)."""
    a, b = flatten(saved), flatten(new)
    return {k: [a.get(k, MISSING), b.get(k, MISSING)] for k in sorted(set(a) | set(b))
            if a.get(k, MISSING) != b.get(k, MISSING)}  # fmt: skip


def describe(changes: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def resume_changes(
    folder: Path, config: dict, allowed: Sequence[str], defaults: Optional[dict] = None
) -> dict:
    """The allowed changes since ``folder/config.yaml``; a forbidden change is a ``UserError``
    naming every such key (no saved config: nothing to compare, ``{}``). A key the saved config
    lacks (added to the toolkit after the run started) at its default in ``defaults`` (the config
    class's) is no change: a new key's default keeps what the code computed before it existed."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return {}
    saved = read_yaml(path)
    changes = config_changes(saved, config)
    added = {k for k, (old, new) in changes.items()
             if old == MISSING and flatten(defaults or {}).get(k, MISSING) == new}  # fmt: skip
    if added:
        logger.info("--resume: %s: not in %s (newer keys), at their defaults",
                    ", ".join(sorted(added)), path)  # fmt: skip
    changes = {k: v for k, v in changes.items() if k not in added}
    forbidden = {k: v for k, v in changes.items() if not any(fnmatch(k, p) for p in allowed)}
    if forbidden:
        raise UserError(
            f"--resume: {describe(forbidden)} differ from {path}, and they change what the run "
            "computes: resume with the saved values, or start a new logging.folder (or "
            "--overwrite)"
        )
    return changes


def read_yaml(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: unreadable saved config ({' '.join(str(e).split())})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: the saved config is not a mapping")
    return saved


# -- what a results.json was made from -------------------------------------------------------
def config_digest(config: dict) -> str:
    """SHA-256 of the config as canonical JSON, ``NOT_CONFIG`` keys left out."""
    flat = {k: v for k, v in flatten(config).items() if k not in NOT_CONFIG}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def file_stamp(path: Optional[PathLike]) -> Optional[dict]:
    """``{"path", "size", "mtime_ns"}`` of a file (``missing`` if absent); None for None."""
    if not path:
        return None
    p = Path(os.path.abspath(path))
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "missing": True}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def folder_stamp(path: PathLike) -> dict:
    """A data folder's stamp: its path and a digest of the (name, mtime) of it and its
    subfolders (adding, removing or renaming an image changes its class folder's mtime; a file
    is stamped by size and mtime). O(classes) stats, not O(images)."""
    p = Path(os.path.abspath(path))
    if not p.is_dir():
        return file_stamp(p)
    entries = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(p) if e.is_dir())
    listing = json.dumps([p.stat().st_mtime_ns, entries]).encode()
    return {"path": str(p), "listing": hashlib.sha256(listing).hexdigest()}


def data_paths(config: dict) -> Iterable[tuple[str, str]]:
    """``(key, path)`` of the config's ``data.*_folder`` / ``data.*_root`` values."""
    for key, value in flatten(config.get("data") or {}, "data").items():
        if isinstance(value, str) and value and key.endswith(("_folder", "_root")):
            yield key, value


def run_inputs(config: Optional[dict], encoder_checkpoint: Optional[PathLike]) -> dict:
    """What a run of ``config`` read: ``{"config": digest, "encoder": stamp, "data": stamps}``
    (``config`` None: ``{"config": None, ...}``, a result nobody can check)."""
    return {
        "config": config_digest(config) if config is not None else None,
        "encoder": file_stamp(encoder_checkpoint),
        "data": {k: folder_stamp(v) for k, v in data_paths(config or {})},
    }


def saved_config(folder: PathLike) -> Optional[dict]:
    """``folder/config.yaml`` (the run's resolved config), None if absent."""
    path = Path(folder) / CONFIG_NAME
    return read_yaml(path) if path.is_file() else None


def stale_reason(results: dict, config: dict) -> Optional[str]:
    """Why ``results`` (a ``results.json``) is not what a run of ``config`` would give: the
    encoder checkpoint, config or data differ (or were not recorded); None when they match."""
    recorded = results.get("inputs")
    if not isinstance(recorded, dict) or recorded.get("config") is None:
        return "it records no inputs (config, encoder checkpoint, data) to check"
    model = config.get("model") or {}
    expected = run_inputs(config, model.get("checkpoint"))
    for part in ("encoder", "config", "data"):
        if recorded.get(part) != expected[part]:
            return {"encoder": "it was made from another encoder checkpoint (or the file "
                    "changed)", "config": "it was made with another config",
                    "data": "its data folders changed"}[part]  # fmt: skip
    return None


def resolved_config(module: str, argv: Sequence[str]) -> dict:
    """The config ``python -m module argv`` would run (its ``--print-config``, in-process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = importlib.import_module(module).main([*argv, "--print-config"])
    if status:
        raise UserError(f"python -m {module} {shlex.join(argv)}: the config does not resolve "
                        f"(exit status {status}, see above)")  # fmt: skip
    return yaml.safe_load(out.getvalue())


def results_staleness(folder: PathLike, module: str, argv: Sequence[str]) -> Optional[str]:
    """Why ``folder/results.json`` is not what ``python -m module argv`` would write now
    (``stale_reason``; an unreadable file is stale too); None when it still fits."""
    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable ({' '.join(str(e).split())})"
    if not isinstance(results, dict):
        return "not a results mapping"
    return stale_reason(results, resolved_config(module, argv))
