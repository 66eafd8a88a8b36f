"""Run logs: ``log.jsonl`` (appended, one JSON object a row), tensorboard scalars, console."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

logger = logging.getLogger("ijepa_toolkit")


class StderrHandler(logging.StreamHandler):
    """A ``StreamHandler`` on whatever ``sys.stderr`` is when a record is written, not the one
    of the first call (a caller that swaps stderr, e.g. pytest per test, then closes it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it
        pass


def setup_console_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    """Plain ``time level message`` lines on stderr; non-main ranks only warn."""
    root = logging.getLogger("ijepa_toolkit")
    if not root.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level if is_main else logging.WARNING)
    root.propagate = False


class RunLogger:
    """Appends metric rows to ``folder/log.jsonl`` and mirrors scalars to tensorboard.

    Only the main rank writes (``enabled=False`` elsewhere). Each row is one write, flushed at
    once, so a killed run loses nothing already logged and never leaves half a row that the
    next row would merge with. The file is only ever appended to: a resumed run writes a
    ``resumed_at`` row (``resumed_at``) and ``read_jsonl`` drops what it supersedes.
    """

    def __init__(self, folder: Union[str, Path], enabled: bool = True, tensorboard: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self._tb = None
        self._purge_step: Optional[int] = None  # tensorboard: hide events of a dead attempt
        self._file = None
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / "log.jsonl"
            self._file = open(path, "a", buffering=1)
            if _ends_mid_line(path):  # a kill during a write: start the next row on its own line
                self._file.write("\n")

    def resumed_at(self, step: int, changes: Optional[dict] = None) -> None:
        """Mark a resume from ``step`` (the checkpoint's; -1: from scratch): the rows an earlier
        attempt logged after ``step`` are superseded by what this run logs (``read_jsonl``),
        and so are tensorboard's events (``purge_step``). ``changes``: the settings changed at
        the resume (``{key: [old, new]}``), recorded in the row."""
        if not self.enabled:
            return
        row = {"step": step, "resumed_at": step, **({"config_changes": changes} if changes else {})}
        self._file.write(json.dumps(row, default=str) + "\n")
        self._purge_step = step + 1
        if self._tb is not None:  # reopen with the purge step on the next scalar
            self._tb.close()
            self._tb = None

    def log(self, step: Optional[int] = None, **values: Any) -> None:
        """One row: ``{"step": step, **values}``; numeric values also go to tensorboard."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self.tensorboard and step is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer().add_scalar(k, v, step)

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"),
                                     purge_step=self._purge_step)  # fmt: skip
        return self._tb

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: Union[str, Path], raw: bool = False) -> list[dict]:
    """The rows of a ``log.jsonl`` file as one run's history; a partial row (a run killed
    mid-write) is skipped.

    A ``resumed_at: S`` row supersedes the rows before it with a step after ``S`` (an attempt
    killed after its checkpoint at ``S``), and a row supersedes an earlier one of the same step
    and the same keys (logged again after the resume); the marker rows themselves are left out.
    ``raw``: every row as written, markers included.
    """
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line)) if line.strip() else None
            except json.JSONDecodeError:
                logger.warning("%s: line %d is a partial row, skipped", path, n)
    return rows if raw else resolve_resumes(rows)


def resolve_resumes(rows: list[dict]) -> list[dict]:
    """``rows`` without what ``resumed_at`` rows and later rows of the same (step, keys)
    supersede (see ``read_jsonl``), in their logged order."""
    kept: list[Optional[dict]] = []
    where: dict[tuple, int] = {}  # (step, keys) -> index into kept
    for row in rows:
        if "resumed_at" in row:
            cut = row["resumed_at"]
            for i, r in enumerate(kept):
                if r is not None and isinstance(r.get("step"), (int, float)) and r["step"] > cut:
                    kept[i] = None
            continue
        if row.get("step") is not None:
            key = (row["step"], tuple(sorted(row)))
            if key in where:
                kept[where[key]] = None
            where[key] = len(kept)
        kept.append(row)
    return [r for r in kept if r is not None]
