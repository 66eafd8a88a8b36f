"""Feature cache against the disk: a file-size limit (the same ``posix_fallocate`` failure as a
full disk) is one ``error:`` line naming the cache and the bytes needed, before any feature is
computed; a read-only shared cache is reused when the same checkpoint sits at another path.

Tests run as root, where ``chmod`` does not stop writes (``os.access`` says writable too): the
read-only case runs the entrypoint as user ``nobody`` (uid 65534, through ``setpriv``) on a
cache owned by root."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ijepa_toolkit.data.digits import build_digits_imagefolder

from .common import REPO, TIMEOUT, env

CKPT = REPO / "tests" / "fixtures" / "ijepa_vit_p8_d64.pth.tar"
NOBODY = 65534


@pytest.fixture
def shared(tmp_path):
    """A folder every user can read (tmp_path's parents are private to root), removed after."""
    root = Path(tempfile.mkdtemp(prefix="cache_disk_"))
    root.chmod(0o755)
    train, val = build_digits_imagefolder(root / "digits", size=32, per_class=10)
    yield root, ["--fname", "knn/digits", f"data.train_folder={train}", f"data.val_folder={val}",
                 "meta.device=cpu", "logging.tensorboard=false"]  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


def knn(args: list[str], preexec=None, extra_env=None, user=()) -> subprocess.CompletedProcess:
    cmd = [*user, sys.executable, "-m", "ijepa_toolkit.eval.knn", *args]
    return subprocess.run(cmd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=preexec, cwd="/")  # fmt: skip


def test_file_size_limit_is_one_error_line_naming_the_cache_and_the_bytes(shared):
    root, args = shared
    cache = root / "cache"

    def limit():  # config.yaml (~1 KB) fits; the 19 KB train entry does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000))

    proc = knn([*args, f"model.checkpoint={CKPT}", f"features.cache_dir={cache}",
                f"logging.folder={root / 'out'}"], preexec=limit)  # fmt: skip
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert err[-1].startswith(f"error: {cache}/.") and ".partial: could not write" in err[-1]
    assert "bytes = 0.00 GiB needed" in err[-1] and "File too large" in err[-1]
    assert not list(cache.glob(".*.partial")) and not (root / "out" / "results.json").exists()


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="needs setpriv")
def test_read_only_shared_cache_is_reused_for_the_same_checkpoint_at_another_path(shared):
    root, args = shared
    cache = root / "cache"
    first = knn([*args, f"model.checkpoint={CKPT}", f"features.cache_dir={cache}",
                 f"logging.folder={root / 'first'}"])  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    moved = root / "elsewhere" / "encoder.pth.tar"
    moved.parent.mkdir()
    shutil.copy2(CKPT, moved)
    memo = (cache / "checkpoint_digests.json").read_text()
    for p in [cache, *cache.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    out = root / "second"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    user = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    as_nobody = {"user": user if os.geteuid() == 0 else (), "extra_env": {"HOME": str(out)}}
    second = knn([*args, f"model.checkpoint={moved}", f"features.cache_dir={cache}",
                  f"logging.folder={out}"], **as_nobody)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    results = [json.loads((d / "results.json").read_text()) for d in (root / "first", out)]
    assert results[1]["metrics"] == results[0]["metrics"]
    assert results[1]["settings"]["cache_reused"] == {"train": True, "test": True}
    assert (cache / "checkpoint_digests.json").read_text() == memo  # not written
    other_layers = knn([*args, f"model.checkpoint={moved}", f"features.cache_dir={cache}",
                        f"logging.folder={out}", "features.layers=concat4"],
                       **as_nobody)  # fmt: skip
    assert other_layers.returncode == 1 and "Traceback" not in other_layers.stderr
    line = other_layers.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {cache}/.") and "is the cache read-only?" in line
