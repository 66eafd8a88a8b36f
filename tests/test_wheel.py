"""The package is self-contained: a wheel built from the repository, installed into a fresh venv
outside it, runs a protocol with a shipped config by name (``ijepa-knn --fname knn/digits``) and
the demo's ``--help`` from an empty directory, importing nothing from the repository.

The new venv reuses the test venv's installed dependencies through a ``.pth`` line (no
download, seconds). Skipped only on request: ``IJEPA_SKIP_WHEEL_TEST=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.wheel,
    pytest.mark.skipif(
        os.environ.get("IJEPA_SKIP_WHEEL_TEST") == "1", reason="IJEPA_SKIP_WHEEL_TEST=1"
    ),  # fmt: skip
]
TINY_ARCH = "model.arch={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"


def sh(cmd: list, cwd: Path, env: dict, timeout: float = 120) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv (outside the repository) with the wheel of a copy of the source tree."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src_copy"  # build from a copy: no build/ or egg-info in the repository
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "src", src / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    sh([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
       root, env, timeout=180)  # fmt: skip
    (wheel,) = (root / "dist").glob("ijepa_toolkit-*.whl")
    sh([sys.executable, "-m", "venv", "--without-pip", root / "venv"], root, env)
    py = root / "venv" / "bin" / "python"
    site = sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env)
    (Path(site.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh([*pip, "--python", py, "install", "--no-deps", "-q", wheel], root, env)
    return root / "venv"


def test_installed_wheel_runs_knn_by_config_name_and_the_demo_help(venv, tmp_path):
    bin_dir, here = venv / "bin", tmp_path / "empty"
    here.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    where = sh([bin_dir / "python", "-c", "import ijepa_toolkit; print(ijepa_toolkit.__file__)"],
               here, env)  # fmt: skip
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve())  # not the repo's src
    sh([bin_dir / "python", "-m", "ijepa_toolkit.data.digits", "digits", "--size", "32"], here, env)
    sh([bin_dir / "ijepa-knn", "--fname", "knn/digits", "data.train_folder=digits/train",
        "data.val_folder=digits/val", "model.checkpoint=null", TINY_ARCH, "knn.ks=[1,5]",
        "features.cache_dir=cache", "logging.folder=run", "logging.tensorboard=false"],
       here, env)  # fmt: skip
    results = json.loads((here / "run" / "results.json").read_text())
    assert results["protocol"] == "knn" and results["which"] == "random_init"
    assert 10.0 < results["metrics"]["top1@k5"] <= 100.0  # 10 classes: better than chance
    assert results["environment"]["toolkit"]
    out = sh([bin_dir / "python", "-m", "ijepa_toolkit.demo", "--help"], here, env)
    assert "--fresh" in out and "runs/demo" in out
    tables = sh([bin_dir / "ijepa-tables", "--fname", "tables/ijepa_in1k", "--dry-run"], here, env)
    assert "-m ijepa_toolkit.eval.linear --fname linprobe/in1k" in tables
    assert sorted(p.name for p in here.iterdir()) == ["cache", "digits", "run"]
