"""Paper tables: run (or collect) one protocol per row, print ours vs the paper's value.

A table config (a shipped ``tables/<id>`` or a file) names metric columns and rows. Each row is
one run of a protocol module (``python -m ijepa_toolkit.eval.linear``, ...) with a config (a
shipped name such as ``linprobe/in1k``, or a file) on a checkpoint, with the value the paper
reports and where it reports it. ``ijepa-tables`` (``make_tables.py``) runs the rows whose run
folder has no ``results.json`` yet, then writes Markdown and CSV: ours, the paper's, and the
difference. A ``results.json`` is used only while the encoder checkpoint, config and data it
records match the row's (``run_folder.results_staleness``); a stale one is an error naming the
row and its folder.

    ijepa-tables --fname tables/ijepa_in1k [--collect] [--dry-run] [--out FOLDER]
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from .configs import find_config
from .engine.logger import setup_console_logging
from .engine.utils import progress
from .errors import UserError
from .run_folder import results_staleness

PROTOCOL_MODULES = {
    "logistic": "ijepa_toolkit.eval.logistic",
    "linprobe": "ijepa_toolkit.eval.linear",
    "knn": "ijepa_toolkit.eval.knn",
    "depth": "ijepa_toolkit.eval.depth",
    "finetune": "ijepa_toolkit.finetune.run",
}
MISSING = "—"


class TableError(UserError):
    """A table config or a run folder that cannot be used; the message names the file and row."""


@dataclasses.dataclass
class Column:
    """One metric column: ``key`` is a dotted path into ``results.json`` (``metrics.top1``)."""

    name: str
    key: str
    digits: int = 1  # decimals shown in Markdown


@dataclasses.dataclass
class Reported:
    """A value a paper reports, and where: ``value: null`` when not (yet) verified."""

    value: Optional[float] = None
    paper: Optional[str] = None
    table: Optional[str] = None
    row: Optional[str] = None

    def source(self) -> str:
        return ", ".join(p for p in (self.paper, self.table, self.row) if p)


@dataclasses.dataclass
class TableRow:
    """One run: ``protocol``'s module with ``--fname config``, the checkpoint and overrides."""

    name: str
    protocol: Literal["logistic", "linprobe", "knn", "depth", "finetune"]
    config: str  # a shipped config name (linprobe/in1k) or a file
    checkpoint: Optional[str] = None  # None: the protocol config's own model.checkpoint
    overrides: list[str] = dataclasses.field(default_factory=list)
    folder: Optional[str] = None  # run folder; default: <runs_root>/<table>/<slug of name>
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # column -> key, per row
    reported: dict[str, Reported] = dataclasses.field(default_factory=dict)  # column -> paper


@dataclasses.dataclass
class TableConfig:
    title: str
    columns: list[Column]
    rows: list[TableRow]
    runs_root: str = "runs/tables"
    # inserted after the python executable, e.g. [-m, torch.distributed.run, --nproc_per_node, "8"]
    launcher: list[str] = dataclasses.field(default_factory=list)
    notes: Optional[str] = None  # printed under the table


@dataclasses.dataclass
class Cell:
    ours: Optional[float]
    paper: Optional[float]

    @property
    def diff(self) -> Optional[float]:
        return None if self.ours is None or self.paper is None else self.ours - self.paper


def slug(text: str) -> str:
    """``"ViT-H/14 1%"`` -> ``"vit-h-14-1pct"``: a folder name."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower().replace("%", "pct")).strip("-")


def check_table(cfg: TableConfig, where: str) -> None:
    """Unique row names, known columns, no empty table; raises ``TableError`` naming the row."""
    if not cfg.columns or not cfg.rows:
        raise TableError(f"{where}: a table needs at least one column and one row")
    names = [c.name for c in cfg.columns]
    seen: dict[str, str] = {}
    for row in cfg.rows:
        s = slug(row.name)
        if s in seen:
            raise TableError(f"{where}: rows '{seen[s]}' and '{row.name}' share the folder '{s}'")
        seen[s] = row.name
        try:
            find_config(row.config)
        except UserError as e:
            raise TableError(f"{where}: row '{row.name}': {e}") from None
        for col in (*row.keys, *row.reported):
            if col not in names:
                raise TableError(
                    f"{where}: row '{row.name}' names column '{col}'; columns: {names}"
                )


def run_folder(cfg: TableConfig, table_id: str, row: TableRow) -> Path:
    return Path(row.folder) if row.folder else Path(cfg.runs_root) / table_id / slug(row.name)


def row_command(
    cfg: TableConfig, table_id: str, row: TableRow, modules: Optional[dict] = None
) -> list[str]:
    """``python [launcher] -m <module> --fname <config> model.checkpoint=.. logging.folder=..``
    (``modules``: protocol -> module, default ``PROTOCOL_MODULES``)."""
    module = (modules or PROTOCOL_MODULES)[row.protocol]
    return [sys.executable, *cfg.launcher, "-m", module, *row_args(cfg, table_id, row)]


def row_args(cfg: TableConfig, table_id: str, row: TableRow) -> list[str]:
    """The protocol's arguments: ``--fname <config> [model.checkpoint=..] logging.folder=..``
    and the row's overrides."""
    args = ["--fname", row.config]
    if row.checkpoint:
        args.append(f"model.checkpoint={row.checkpoint}")
    args.append(f"logging.folder={run_folder(cfg, table_id, row)}")
    return args + list(row.overrides)


def check_fresh(cfg: TableConfig, table_id: str, modules: Optional[dict] = None) -> None:
    """Every existing ``results.json`` still fits its row (encoder checkpoint, config, data);
    a stale one is a ``TableError`` naming the row and the folder."""
    for row in cfg.rows:
        folder = run_folder(cfg, table_id, row)
        if load_results(folder, row) is None:  # (a results.json of another protocol: an error)
            continue
        module = (modules or PROTOCOL_MODULES)[row.protocol]
        reason = results_staleness(folder, module, row_args(cfg, table_id, row))
        if reason is not None:
            raise TableError(
                f"row '{row.name}': {folder / 'results.json'}: {reason}; delete {folder} to run "
                "the row again, or point the row's folder elsewhere"
            )


def show_command(cmd: Sequence[str]) -> str:
    """The command as a shell line, paths under the working directory shown relative to it."""
    cwd = Path.cwd()

    def short(part: str) -> str:
        p = Path(part)
        if p.is_absolute():
            try:
                return str(p.relative_to(cwd))
            except ValueError:
                return part
        return part

    return shlex.join(short(c) for c in cmd)


def read_metric(results: dict, key: str, path: Path) -> float:
    """``results["metrics"]["top1"]`` for ``key="metrics.top1"``; a clear error otherwise."""
    node = results
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            have = sorted(results.get("metrics", {})) if isinstance(results, dict) else []
            raise TableError(f"{path}: no '{key}' (metrics present: {have})")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise TableError(f"{path}: '{key}' = {node!r} is not a number")
    return float(node)


def load_results(folder: Path, row: TableRow) -> Optional[dict]:
    """The row's ``results.json``, or None when the run has not finished."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TableError(f"{path}: unreadable results ({e})") from None
    if not isinstance(results, dict) or results.get("protocol") != row.protocol:
        found = results.get("protocol") if isinstance(results, dict) else None
        raise TableError(
            f"{path}: protocol {found!r}, but row '{row.name}' runs '{row.protocol}'; "
            "point the row's folder at its own run"
        )
    return results


def collect(cfg: TableConfig, table_id: str) -> list[list[Cell]]:
    """One list of cells (one per column) per row; ``ours`` is None where no results exist."""
    table = []
    for row in cfg.rows:
        folder = run_folder(cfg, table_id, row)
        results = load_results(folder, row)
        cells = []
        for col in cfg.columns:
            key = row.keys.get(col.name, col.key)
            ours = None if results is None else read_metric(results, key, folder / "results.json")
            reported = row.reported.get(col.name)
            cells.append(Cell(ours, reported.value if reported else None))
        table.append(cells)
    return table


def _fmt(value: Optional[float], digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _sources(row: TableRow) -> str:
    found = [r.source() for r in row.reported.values() if r.value is not None and r.source()]
    return "; ".join(dict.fromkeys(found)) or MISSING


def to_markdown(cfg: TableConfig, cells: list[list[Cell]]) -> str:
    """``## title`` and a table: per column ours | paper | Δ (ours − paper), then the source."""
    head = ["row", "protocol"]
    for col in cfg.columns:
        head += [f"{col.name} ours", f"{col.name} paper", f"{col.name} Δ"]
    head.append("source (paper, table, row)")
    lines = [f"## {cfg.title}", "", "| " + " | ".join(head) + " |"]
    lines.append(
        "| " + " | ".join(["---", "---"] + ["---:"] * 3 * len(cfg.columns) + ["---"]) + " |"
    )
    for row, row_cells in zip(cfg.rows, cells):
        parts = [row.name, row.protocol]
        for col, c in zip(cfg.columns, row_cells):
            parts += [_fmt(c.ours, col.digits), _fmt(c.paper, col.digits),
                      _fmt(c.diff, col.digits, signed=True)]  # fmt: skip
        parts.append(_sources(row))
        lines.append("| " + " | ".join(p.replace("|", "/") for p in parts) + " |")
    if cfg.notes:
        lines += ["", cfg.notes.strip()]
    return "\n".join(lines) + "\n"


def to_csv(cfg: TableConfig, table_id: str, cells: list[list[Cell]]) -> str:
    """Long format, one line per row and column, full precision; empty where missing."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["table", "row", "protocol", "column", "ours", "paper", "diff",
                     "paper_source", "paper_table", "paper_row", "run_folder"])  # fmt: skip
    for row, row_cells in zip(cfg.rows, cells):
        for col, c in zip(cfg.columns, row_cells):
            rep = row.reported.get(col.name) or Reported()
            writer.writerow([
                table_id, row.name, row.protocol, col.name,
                *("" if v is None else f"{v:.10g}" for v in (c.ours, c.paper, c.diff)),
                rep.paper or "", rep.table or "", rep.row or "", run_folder(cfg, table_id, row),
            ])  # fmt: skip
    return out.getvalue()


def pending_rows(cfg: TableConfig, table_id: str) -> list[TableRow]:
    """Rows whose run folder has no ``results.json``."""
    return [r for r in cfg.rows if not (run_folder(cfg, table_id, r) / "results.json").is_file()]


def run_rows(
    cfg: TableConfig,
    table_id: str,
    rows: Sequence[TableRow],
    modules: Optional[dict] = None,
    dry_run: bool = False,
) -> list[str]:
    """Run each row's command (or only print it); returns the names of rows that failed."""
    failed = []
    for row in progress(rows, f"table {table_id}", unit="row", enabled=not dry_run, every_n=1):
        cmd = row_command(cfg, table_id, row, modules)
        print(show_command(cmd), flush=True)
        if dry_run:
            continue
        if (
            subprocess.run(cmd, check=False).returncode != 0
            or not (run_folder(cfg, table_id, row) / "results.json").is_file()
        ):
            print(f"row '{row.name}' failed: no results.json written", file=sys.stderr)
            failed.append(row.name)
    return failed


def write_outputs(
    cfg: TableConfig, table_id: str, cells: list[list[Cell]], out: Union[str, Path]
) -> tuple[Path, Path]:
    """``out/<table>.md`` and ``out/<table>.csv``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / f"{table_id}.md", out / f"{table_id}.csv"
    md.write_text(to_markdown(cfg, cells))
    csv_path.write_text(to_csv(cfg, table_id, cells))
    return md, csv_path


def main(argv: Optional[Sequence[str]] = None, modules: Optional[dict] = None) -> int:
    """``ijepa-tables --fname tables/<id> [--collect] [--dry-run] [--out F]``: exit status."""
    from .config import config_parser, parse_config

    parser = config_parser("Run or collect the rows of a paper table; print ours vs the paper")
    parser.add_argument("--collect", action="store_true",
                        help="only gather existing results.json files, run nothing")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands of the rows to run, run nothing")  # fmt: skip
    parser.add_argument("--out", default=None, help="folder for <table>.md / .csv "
                        "(default: <runs_root>/<table>)")  # fmt: skip
    try:
        cfg, args = parse_config(TableConfig, parser, argv)
    except SystemExit as e:  # --help, or a config error already printed
        return e.code if isinstance(e.code, int) else 2
    if not args.fname:
        print("error: --fname tables/<name> (or a table file) is required", file=sys.stderr)
        return 2
    table_id = Path(args.fname).stem
    setup_console_logging()  # the rows' progress lines
    try:
        check_table(cfg, args.fname)
        check_fresh(cfg, table_id, modules)
        failed = []
        if not args.collect:
            failed = run_rows(cfg, table_id, pending_rows(cfg, table_id), modules,
                              args.dry_run)  # fmt: skip
        if args.dry_run:
            return 0
        cells = collect(cfg, table_id)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md, csv_path = write_outputs(cfg, table_id, cells, args.out or Path(cfg.runs_root) / table_id)
    print(md.read_text(), end="")
    print(f"\nwrote {md} and {csv_path}")
    if failed:
        print(f"error: {len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
