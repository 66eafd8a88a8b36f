"""kNN under torchrun (2 CPU processes, gloo): sharded feature extraction into one cache entry
and a training bank sharded across ranks give the single-process results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ijepa_toolkit.eval import knn as knn_eval

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ijepa_vit_p8_d64.pth.tar"


def test_sharded_extraction_and_bank_match_single_process(tmp_path):
    from ijepa_toolkit.data.digits import build_digits_imagefolder

    train, val = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=40)
    common = [
        "--fname", "knn/digits", f"data.train_folder={train}",
        f"data.val_folder={val}", f"model.checkpoint={FIXTURE}", "logging.tensorboard=false",
        "data.batch_size=16", "knn.ks=[1,5,20]",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results, feats = {}, {}
    for name in ("single", "ddp"):
        out = tmp_path / name
        args = [*common, f"logging.folder={out}", f"features.cache_dir={out / 'cache'}"]
        if name == "single":
            assert knn_eval.main(args[:]) == 0
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", "29517", "-m", "ijepa_toolkit.eval.knn", *args]  # fmt: skip
            proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=240)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((out / "results.json").read_text())
        feats[name] = {
            json.loads((e / "meta.json").read_text())["dataset"]["num_samples"]: (
                np.load(e / "features.npy"), np.load(e / "labels.npy"))
            for e in (out / "cache").iterdir() if (e / "meta.json").is_file()
        }  # fmt: skip
    assert results["ddp"]["settings"]["world_size"] == 2
    assert results["ddp"]["metrics"] == results["single"]["metrics"]
    assert feats["ddp"].keys() == feats["single"].keys() and len(feats["ddp"]) == 2
    for n, (x, y) in feats["single"].items():
        np.testing.assert_allclose(feats["ddp"][n][0], x, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(feats["ddp"][n][1], y)


def _train_heads_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank of ``test_ddp_heads_equal_one_process_on_the_whole_batch``."""
    import torch
    import torch.distributed as dist

    from ijepa_toolkit.engine.distributed import DistInfo, cleanup
    from ijepa_toolkit.eval.linear_heads import (
        build_scheduler,
        make_heads,
        make_optimizer,
        train_heads,
    )

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(4, 32, 16, generator=g), torch.randint(0, 5, (4, 32), generator=g)
    torch.manual_seed(1)
    heads = make_heads(16, 5, 3, batchnorm=False)
    grid = [(0.5, 0.0), (1.0, 1e-3), (2.0, 0.0)]
    opt = make_optimizer(heads, grid, "lars", momentum=0.9)
    sched = build_scheduler(opt, "cosine", epochs=2, steps_per_epoch=2, warmup_epochs=0.5)
    half = slice(rank * 16, (rank + 1) * 16) if world > 1 else slice(None)

    def batches(epoch: int):
        for step in (2 * epoch, 2 * epoch + 1):
            yield feats[step, half], labels[step, half]

    train_heads(heads, opt, batches, 2, 2, sched, DistInfo(rank, world))
    if rank == 0:
        torch.save(heads.state_dict(), out)
    cleanup(finished=True)  # (a no-op in one process)


def test_ddp_heads_equal_one_process_on_the_whole_batch(tmp_path):
    """DDP averages the heads' gradients over ranks: two ranks with half a batch each end
    with the heads of one process trained on the whole batch."""
    import torch
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_train_heads_worker, args=(2, init, str(tmp_path / "ddp.pt")), nprocs=2)
    _train_heads_worker(0, 1, init, str(tmp_path / "single.pt"))
    ddp, single = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("ddp", "single"))
    assert ddp.keys() == single.keys()
    for key in single:
        assert not torch.equal(single[key], torch.zeros_like(single[key]))
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6)
