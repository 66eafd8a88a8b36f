"""Leaving the process group: ranks that finished wait for each other first (else gloo may
abort the rank that tears down first); after an error no rank waits."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from ijepa_toolkit.errors import UserError
from ijepa_toolkit.runs import EXIT_OK, EXIT_USER, run_main


def _fail() -> None:
    raise UserError("bad value")


@pytest.mark.parametrize("work, status, finished", [(lambda: None, EXIT_OK, True),
                                                    (_fail, EXIT_USER, False)])  # fmt: skip
def test_run_main_tells_cleanup_whether_the_work_returned(work, status, finished):
    seen = []
    assert run_main(work, seen.append) == status
    assert seen == [finished]


def _leave(rank: int, init: str, out: str, finished: bool) -> None:
    """Rank 0 leaves the group 1 s late (``finished``) or never (an error on rank 1 while rank 0
    is elsewhere); rank 1 records how long its ``cleanup`` took."""
    import os

    import torch.distributed as dist

    from ijepa_toolkit.engine.distributed import cleanup

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    done = Path(out).with_suffix(".done")
    if rank == 1:
        start = time.perf_counter()
        cleanup(finished)
        Path(out).write_text(str(time.perf_counter() - start))
        done.touch()
        return
    if finished:
        time.sleep(1.0)
        cleanup(True)
        return
    while not done.exists():  # the rank that never comes: it only waits to be let go
        time.sleep(0.05)
    os._exit(0)


@pytest.mark.parametrize("finished", [True, False])
def test_cleanup_waits_for_every_rank_only_after_a_normal_end(tmp_path, finished):
    import torch.multiprocessing as mp

    out = tmp_path / "seconds.txt"
    mp.spawn(_leave, args=(f"file://{tmp_path / 'rendezvous'}", str(out), finished), nprocs=2)
    seconds = float(out.read_text())
    assert seconds >= 0.8 if finished else seconds < 5.0, seconds
