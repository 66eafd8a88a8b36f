"""A checkpoint write that is killed, or that runs out of space, never leaves a half file: the
previous checkpoint stays readable, and the run stops with one clear line."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ijepa_toolkit.configs import find_config
from ijepa_toolkit.errors import WriteError
from ijepa_toolkit.io import save as save_module
from ijepa_toolkit.io.read import read_checkpoint
from ijepa_toolkit.io.save import save_checkpoint

from .common import REPO, TIMEOUT, env

WRITER = textwrap.dedent(
    """
    import sys, torch
    from ijepa_toolkit.io.save import save_checkpoint
    k = 0
    while True:  # versions k = 1, 2, ...: every tensor holds k, so a mix of two is visible
        k += 1
        save_checkpoint({"k": k, "w": torch.full((1 << 20,), float(k)),
                         "v": torch.full((1 << 18,), float(k))}, sys.argv[1])
    """
)


def test_sigkill_during_checkpoint_writes_leaves_the_old_or_the_new_file(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    rng = random.Random(0)
    seen = -1
    left: set = set()  # temp files of killed writes: a later save keeps them while they are fresh
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env())
        deadline = time.time() + TIMEOUT
        while not path.exists():  # one whole write first: the kills below hit later writes
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.001)
        # wait until a write of this writer is under way (a new temp file), then a random delay
        while not set(tmp_path.glob(".checkpoint-last.pth.*.tmp")) - left:
            assert proc.poll() is None and time.time() < deadline
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if path.exists():
            obj = read_checkpoint(path)
            k = obj["k"]
            assert torch.all(obj["w"] == k) and torch.all(obj["v"] == k), k
            assert obj["w"].numel() == 1 << 20 and obj["v"].numel() == 1 << 18
            seen = max(seen, k)
        left = set(tmp_path.glob(".checkpoint-last.pth.*.tmp"))
        assert len(left) <= 4  # at most one per killed write: fresh ones may be a live writer's
    assert seen >= 1, "no write ever completed"
    # once stale (not modified for STALE_TEMP_AGE_S), the next save of the path removes them
    old = time.time() - save_module.STALE_TEMP_AGE_S - 60
    for tmp in left:
        os.utime(tmp, (old, old))
    save_checkpoint({"k": 0}, path)
    assert sorted(os.listdir(tmp_path)) == [path.name, f"{path.name}.sha256"]


def test_disk_full_in_a_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(8)}, path)
    before = path.read_bytes()

    class FullDisk:
        """The temporary file: accepts 4 KiB, then ENOSPC like a full file system."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    # the module's own open() (which save_checkpoint writes the temporary file with) fills up
    monkeypatch.setattr(save_module, "open", lambda p, mode: FullDisk(open(p, mode)), raising=False)
    with pytest.raises(WriteError) as exc:
        save_checkpoint({"epoch": 2, "w": torch.zeros(1 << 16)}, path)
    monkeypatch.undo()
    msg = str(exc.value)
    assert msg.startswith(f"{path}: could not write the checkpoint (No space left on device)")
    assert exc.value.errno == errno.ENOSPC and isinstance(exc.value, OSError)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name, f"{path.name}.sha256"]


def test_depth_run_stops_when_the_disk_refuses_a_checkpoint(tmp_path, depth_scenes):
    """A real OS write failure: the running probe's file-size limit is lowered (prlimit) below
    its checkpoint's size, so the next checkpoint write fails with EFBIG in the kernel."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "depth_eval.py"), "--fname",
           str(find_config("depth/tiny_synthetic")), f"data.train_folder={depth_scenes}",
           f"logging.folder={out}", "logging.tensorboard=false", "optimization.epochs=40",
           "optimization.batch_size=32", "eval.visualisations=0"]  # fmt: skip
    no_sigxfsz = lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # noqa: E731
    proc = subprocess.Popen(cmd, env=env(), stderr=subprocess.PIPE, text=True,
                            preexec_fn=no_sigxfsz)  # fmt: skip
    ckpt = out / "checkpoint-last.pth"
    deadline = time.time() + TIMEOUT
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    limit = ckpt.stat().st_size // 2
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    kept = read_checkpoint(ckpt)["epoch"]  # every later write fails
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1, err  # WriteError: exit 1 (runs.run_main's taxonomy)
    last = err.strip().splitlines()[-1]
    assert last == (f"error: {ckpt}: could not write the checkpoint (File too large); the "
                    "previous file, if any, is unchanged")  # fmt: skip
    obj = read_checkpoint(ckpt)
    assert obj["epoch"] == kept < 40 and obj["model"]
    assert not list(out.glob(".*.tmp")) and not (out / "results.json").exists()
