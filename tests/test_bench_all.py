"""``make bench``'s driver (bench/all.py) at its tiny size, so it cannot rot: every section runs,
every row has both figures and a ratio or says why its contender was skipped."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def driver():
    return load("all")


def test_tiny_run_prints_every_ratio_and_the_machine(driver, capsys, monkeypatch):
    monkeypatch.delenv("IJEPA_OFFICIAL_SRC", raising=False)
    assert driver.main(["--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"{os.cpu_count()} cores" in out and "torch " in out and "load average" in out
    table = out[out.index("| bench |") :].splitlines()[2:]
    benches = {line.split(" | ")[0].strip("| ").split(" ")[0] for line in table}
    assert benches == {"extraction", "kNN", "pretrain", "logistic"}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[-1].startswith("skipped"):
            assert "failed" not in cells[-1] and len(cells[-1]) > len("skipped: ")
            continue
        toolkit, other, ratio = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
        assert toolkit > 0 and other > 0
        faster = other / toolkit if cells[2].startswith("s") else toolkit / other
        assert ratio == pytest.approx(faster, rel=0.02, abs=0.01)
    official = [line for line in table if "official code's step" in line]
    assert official and all("skipped" in line and "--official-src" in line for line in official)
    extraction = [line for line in table if "timm + torchvision" in line]
    assert extraction and "skipped" not in extraction[0]


def test_a_missing_contender_is_a_skipped_row(driver):
    contenders = load("contenders")
    assert contenders.missing("torch") is None
    reason = contenders.missing("surely_not_an_installed_module")
    assert "surely_not_an_installed_module is not installed" in reason
    row = contenders.Row("kNN", "faiss", skipped=reason)
    assert row.ratio is None and row.line() == f"kNN vs faiss: skipped ({reason})"


def test_a_failing_section_is_reported_and_fails_the_run(driver, monkeypatch, capsys):
    def broken(**kwargs):
        raise RuntimeError("knn broke")

    monkeypatch.setattr(driver.knn, "compare", broken)
    assert driver.main(["--size", "tiny", "--only", "knn"]) == 1
    assert "failed: RuntimeError: knn broke" in capsys.readouterr().out


def test_timing_in_turn_rotates_who_runs_first():
    contenders = load("contenders")
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = contenders.alternating(fns, rounds=3, warmup=0)
    assert calls == list("abcbcacab") and set(times) == set("abc")  # abc, bca, cab


def test_official_source_must_hold_the_official_modules(tmp_path):
    step = load("pretrain_step")
    with pytest.raises(SystemExit, match="no src/models/"):
        step.official_src(tmp_path)
