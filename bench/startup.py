"""Start-up time of every entrypoint: ``--help`` in a fresh process, wall time (median of
``--repeat`` runs) and the number of modules it imported, and whether torch was among them.

    python bench/startup.py [--repeat 3] [--args "--help"]

The entrypoints are the top-level scripts and the ``ijepa-*`` console scripts (as the
installed package declares them). Target (issue 19 item 5): every one under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "knn_eval.py", "logistic_eval.py", "main_linprobe.py", "rank_eval.py", "depth_eval.py",
    "main_pretrain.py", "main_finetuning.py", "make_tables.py", "visualize.py",
)  # fmt: skip
HEAVY = ("torch", "timm", "torchvision", "transformers", "sklearn", "cyanure", "matplotlib")
# The child runs the entrypoint as its own process would, then reports its module set on exit
# (argparse's --help and errors leave through SystemExit, so atexit still runs).
PROBE = """
import atexit, json, os, runpy, sys
def report():
    with open(os.environ["IJEPA_STARTUP_REPORT"], "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(report)
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, *sys.argv[3:]]
if kind == "script":
    runpy.run_path(target, run_name="__main__")
else:
    import importlib
    module, _, attr = target.partition(":")
    sys.exit(getattr(importlib.import_module(module), attr)())
"""


def entrypoints() -> list[tuple[str, str, str]]:
    """``(name, kind, target)``: the top-level scripts, then the installed ``ijepa-*`` console
    scripts (``module:function``)."""
    found = [(name, "script", str(ROOT / name)) for name in SCRIPTS]
    scripts = entry_points(group="console_scripts")
    found += sorted(
        (e.name, "console", e.value) for e in scripts if e.value.startswith("ijepa_toolkit")
    )
    return found


def run_once(
    kind: str, target: str, args: list[str], report: Path
) -> tuple[float, list[str], int, str]:
    """(wall seconds, imported module names, exit status, stderr) of one fresh run."""
    env = {**os.environ, "IJEPA_STARTUP_REPORT": str(report), "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, kind, target, *args],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    took = time.perf_counter() - start
    modules = json.loads(report.read_text()) if report.is_file() else []
    return took, modules, proc.returncode, proc.stderr


def measure(kind: str, target: str, args: list[str], repeat: int, report: Path) -> dict:
    """Median wall time over ``repeat`` fresh runs, module count and heavy modules imported."""
    times, modules, status = [], [], None
    for _ in range(repeat):
        took, modules, status, _ = run_once(kind, target, args, report)
        times.append(took)
    heavy = [m for m in HEAVY if m in modules]
    return {"median_s": statistics.median(times), "modules": len(modules), "heavy": heavy,
            "exit": status}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="fresh runs per entrypoint")
    parser.add_argument("--args", default="--help", help="arguments given to each entrypoint")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    opts = parser.parse_args(argv)
    args = shlex.split(opts.args)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{'entrypoint':<20} {'median s':>9} {'modules':>8} exit  heavy modules imported")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, target in entrypoints():
            r = results[name] = measure(kind, target, args, opts.repeat, Path(tmp) / "m.json")
            print(f"{name:<20} {r['median_s']:>9.2f} {r['modules']:>8} {r['exit']:>4}  "
                  f"{' '.join(r['heavy']) or '-'}")  # fmt: skip
    slow = [n for n, r in results.items() if r["median_s"] >= 1.0]
    print(f"over 1 s: {', '.join(slow) if slow else 'none'}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
