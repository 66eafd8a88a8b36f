"""The README's demo table is what ``python -m ijepa_toolkit.demo`` prints on a fresh folder at
the thread count the README records (the whole demo, about 2.5 min on 2 cores)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from ijepa_toolkit.demo import other_threads

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- demo-table -->\n(.*?)<!-- /demo-table -->", re.S)


def parse(text: str, where: str) -> tuple[list[list[str]], int]:
    """The table's rows (cells stripped, the ``| --- |`` line left out) and the ``threads: N``."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not set(line) <= set("|- ")
    ]
    threads = re.search(r"^threads: (\d+)$", text, re.M)
    assert rows and threads, f"{where}: no table or no 'threads: N' line in\n{text}"
    return rows, int(threads.group(1))


def test_readme_demo_table_is_what_the_demo_prints(tmp_path):
    block = BLOCK.search(README.read_text())
    assert block, f"{README}: no <!-- demo-table --> ... <!-- /demo-table --> block"
    readme_rows, threads = parse(block.group(1), str(README))
    cmd = [sys.executable, "-m", "ijepa_toolkit.demo", "--threads", str(threads)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = tmp_path / "runs" / "demo" / "table.md"
    demo_rows, demo_threads = parse(table.read_text(), str(table))
    assert demo_threads == threads
    assert demo_rows == readme_rows, "README demo table differs from the demo's:\n" + (
        table.read_text()
    )
    recorded = json.loads((tmp_path / "runs/demo/knn/pretrained/results.json").read_text())
    assert recorded["environment"]["threads"] == threads


def test_a_result_made_at_another_thread_count_is_not_reused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"environment": {"threads": 2}}))
    assert other_threads(tmp_path, {"OMP_NUM_THREADS": "2"}) is None
    reason = other_threads(tmp_path, {"OMP_NUM_THREADS": "1"})
    assert reason == "made at 2 threads, the demo runs at 1"
