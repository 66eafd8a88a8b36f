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


def setup_console_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    """Plain ``time level message`` lines on stderr; non-main ranks only warn."""
    root = logging.getLogger("ijepa_toolkit")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level if is_main else logging.WARNING)
    root.propagate = False


class RunLogger:
    """Appends metric rows to ``folder/log.jsonl`` and mirrors scalars to tensorboard.

    Only the main rank writes (``enabled=False`` elsewhere). Each row is flushed at once, so a
    killed run loses nothing already logged; a resumed run appends to the same file.
    """

    def __init__(self, folder: Union[str, Path], enabled: bool = True, tensorboard: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self._tb = None
        self._file = None
        self._logged: Optional[set] = None  # (step, key) pairs already in the file, on resume
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / "log.jsonl"
            self._file = open(path, "a", buffering=1)
            if _ends_mid_line(path):  # a kill during a write: start the next row on its own line
                self._file.write("\n")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"))

    def skip_logged(self) -> None:
        """After a resume: do not write a row again whose (step, key) pairs are all in the file.

        A run killed after its last checkpoint logged the steps it then repeats on resume; those
        rows stay (the file is never truncated) and the repeated rows are dropped. A row is
        written whole or not at all (a row is one write, so a kill never leaves half a row).
        """
        path = self.folder / "log.jsonl"
        if self.enabled and path.is_file():
            self._logged = {(r.get("step"), k) for r in read_jsonl(path) for k in r if k != "step"}

    def log(self, step: Optional[int] = None, **values: Any) -> None:
        """One row: ``{"step": step, **values}``; numeric values also go to tensorboard."""
        if not self.enabled:
            return
        if self._logged and step is not None and all((step, k) in self._logged for k in values):
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None and step is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

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


def read_jsonl(path: Union[str, Path]) -> list[dict]:
    """All rows of a ``log.jsonl`` file; a partial row (a run killed mid-write) is skipped."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line)) if line.strip() else None
            except json.JSONDecodeError:
                logger.warning("%s: line %d is a partial row, skipped", path, n)
    return rows


def write_json_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """Write JSON to a temporary file and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_results(folder: Union[str, Path], protocol: str, metrics: dict, **fields: Any) -> Path:
    """``folder/results.json``: ``{"protocol", "metrics", ...fields}``, the input of the tables."""
    return write_json_atomic(
        {"protocol": protocol, "metrics": metrics, **fields}, Path(folder) / "results.json"
    )
