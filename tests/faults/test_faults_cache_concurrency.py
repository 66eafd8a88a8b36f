"""Feature cache under concurrency and kills: several processes extracting one key at once all
get the clean result (one of them extracts, the others reuse its entry); an extraction killed
with SIGKILL resumes from its last recorded chunk, on another number of ranks, and the entry
equals an uninterrupted run's byte for byte."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ijepa_toolkit.data.digits import build_digits_imagefolder

from ._cache_worker import run as run_worker
from .common import TIMEOUT, env

WORKER = Path(__file__).with_name("_cache_worker.py")
CHUNK = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    train, _ = build_digits_imagefolder(tmp_path_factory.mktemp("img") / "d", 16, per_class=8)
    return train


def n_images(folder: Path) -> int:
    return len([p for p in folder.rglob("*") if p.is_file()])


def clean_run(images: Path, cache: Path, chunk: int = 0) -> tuple[dict, Path]:
    """An uninterrupted in-process run: (its arrays, its cache entry)."""
    out = cache.parent / f"{cache.name}_out"
    out.mkdir(parents=True)
    run_worker(str(images), cache, out, argparse.Namespace(chunk=chunk, sleep=0.0, kill_after=0,
                                                           go=""))  # fmt: skip
    (entry,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return dict(np.load(out / "rank0.npz")), entry


def worker(images: Path, cache: Path, out: Path, *options: str, ranks: int = 1):
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*launcher, str(WORKER), str(images), str(cache), str(out), *options]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> int:
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return proc.returncode


def test_three_processes_extracting_one_key_at_once_all_get_the_clean_result(images, tmp_path):
    ref, _ = clean_run(images, tmp_path / "clean")
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [worker(images, cache, tmp_path / f"p{i}", "--go", str(go), "--sleep", "0.05")
             for i in range(3)]  # fmt: skip
    deadline = time.time() + TIMEOUT
    while len(list(tmp_path.glob("p*/ready.*"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()  # all three call load_or_extract now, on a cold cache
    assert [finish(p) for p in procs] == [0, 0, 0]
    runs = [json.loads((tmp_path / f"p{i}" / "rank0.json").read_text()) for i in range(3)]
    assert sorted(r["forwarded"] for r in runs) == [0, 0, n_images(images)]  # 1 writer, 2 reuse
    for i in range(3):
        got = np.load(tmp_path / f"p{i}" / "rank0.npz")
        np.testing.assert_array_equal(got["feats"], ref["feats"])
        np.testing.assert_array_equal(got["labels"], ref["labels"])
    assert not list(cache.glob(".*.partial"))


def test_killed_extraction_resumes_from_its_last_chunk_on_two_ranks(images, tmp_path):
    n = n_images(images)
    kill_after = round(0.6 * -(-n // CHUNK))  # about 60 % of the chunks
    _, ref_entry = clean_run(images, tmp_path / "clean", chunk=CHUNK)
    cache, chunk = tmp_path / "cache", ["--chunk", str(CHUNK)]
    killed = worker(images, cache, tmp_path / "killed", *chunk, "--kill-after", str(kill_after))
    assert finish(killed) == -signal.SIGKILL
    (partial,) = cache.glob(".*.partial")
    assert len(list(partial.glob("chunks/*.done"))) == kill_after
    rerun = worker(images, cache, tmp_path / "rerun", *chunk, ranks=2)
    assert finish(rerun) == 0
    counts = [json.loads((tmp_path / "rerun" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(c["forwarded"] for c in counts) == n - kill_after * CHUNK  # only the rest
    entry = cache / ref_entry.name  # same key
    for name in ("features.npy", "labels.npy"):
        assert (entry / name).read_bytes() == (ref_entry / name).read_bytes(), name
    assert not partial.exists()
