"""Start-up (issue 19 item 5): ``--help``, ``--print-config`` and config errors of every
entrypoint answer without importing torch or the other heavy libraries; each runs in a fresh
process (``bench/startup.py``'s probe reports the process's ``sys.modules`` at exit). The times
are measured by ``bench/startup.py``, not asserted here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "startup.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_startup", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


startup = _bench()
ENTRYPOINTS = startup.entrypoints()
BY_NAME = {name: (kind, target) for name, kind, target in ENTRYPOINTS}


def run(name: str, args: list[str], tmp_path: Path) -> tuple[list[str], int, str]:
    """(imported modules, exit status, stderr) of entrypoint ``name`` run with ``args``."""
    kind, target = BY_NAME[name]
    _, modules, status, stderr = startup.run_once(kind, target, args, tmp_path / "modules.json")
    return modules, status, stderr


def heavy(modules: list[str]) -> list[str]:
    return [m for m in startup.HEAVY if m in modules]


def test_every_entrypoint_is_listed():
    names = {name for name, _, _ in ENTRYPOINTS}
    assert {"knn_eval.py", "main_pretrain.py", "visualize.py", "make_tables.py"} <= names
    assert {"ijepa-knn", "ijepa-finetune", "ijepa-pretrain", "ijepa-export"} <= names


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_help_imports_no_heavy_library(name, tmp_path):
    modules, status, stderr = run(name, ["--help"], tmp_path)
    assert status == 0, stderr
    assert "ijepa_toolkit" in modules  # the probe saw the entrypoint run
    assert heavy(modules) == []


CONFIGS = {  # entrypoint -> a shipped config
    "knn_eval.py": "knn/digits", "logistic_eval.py": "logistic/digits",
    "main_linprobe.py": "linprobe/digits", "rank_eval.py": "rank/digits",
    "main_finetuning.py": "finetune/tiny_cpu", "main_pretrain.py": "pretrain/tiny_cpu",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_print_config_imports_no_heavy_library(name, tmp_path):
    modules, status, stderr = run(name, ["--fname", CONFIGS[name], "--print-config"], tmp_path)
    assert status == 0, stderr
    assert heavy(modules) == []


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_error_is_one_line_without_torch(name, tmp_path):
    args = ["--fname", CONFIGS[name], "meta.seedd=1"]  # a misspelt key
    modules, status, stderr = run(name, args, tmp_path)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "meta.seed" in lines[0]
    assert heavy(modules) == []


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_missing_folder_error_comes_before_torch(name, tmp_path):
    """A file-system check (``config.require_paths``) also runs before any model is built."""
    missing = tmp_path / "nowhere"
    args = ["--fname", CONFIGS[name], f"data.train_folder={missing}",
            f"logging.folder={tmp_path / 'run'}"]  # fmt: skip
    if name != "main_pretrain.py":  # (pretraining reads no val_folder)
        args.append(f"data.val_folder={missing}")
    if name in ("main_finetuning.py", "main_pretrain.py"):
        args.append("data.digits_root=")  # (their configs build the digits instead)
    modules, status, stderr = run(name, args, tmp_path)
    line = stderr.strip()  # rank_eval.py checks only the folder of rank.split (val)
    assert status == 2 and "_folder must be an existing folder" in line and str(missing) in line
    assert heavy(modules) == []


def test_probe_sees_torch_when_work_starts(tmp_path):
    """The check can fail: an entrypoint that does work imports torch, and the probe sees it."""
    modules, status, stderr = run("ijepa-inspect", [str(tmp_path / "missing.pth")], tmp_path)
    assert status != 0 and "error:" in stderr and "missing.pth" in stderr
    assert "torch" in modules
