"""Peak memory of one linear-probe epoch over a feature cache: the toolkit's ``cached_batches``
(batches read from the memory-mapped cache) against the previous in-memory way (the whole cache
copied into a tensor, then its fit rows copied again). Each runs in its own process on the same
(N, D) float32 cache; prints peak RSS (which also counts the cache pages mapped: those are the
page cache, shared by all ranks and evictable, while copies are private to each rank), seconds
per epoch and the ratios. ImageNet at ViT-H concat4 is N = 1.28 M, D = 5120: 26 GB per copy.

    python bench/linprobe_memory.py [--rows 200000 --dim 1024 --batch 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def one_epoch(cache: str, way: str, batch: int) -> dict:
    """Run one epoch of batches the ``way`` given; peak RSS (MiB) and seconds."""
    from ijepa_toolkit.eval.linear import cached_batches

    feats = np.load(cache, mmap_mode="r")
    labels = np.arange(len(feats)) % 1000
    rows = np.arange(0, len(feats))[np.arange(len(feats)) % 10 != 0]  # 90% fit rows
    start = time.perf_counter()
    head = torch.nn.Linear(feats.shape[1], 1000)
    if way == "memmap":
        batches, _ = cached_batches(feats, labels, rows, batch, 0, 0, 1, torch.device("cpu"))
    else:  # before: x = from_numpy(np.array(feats)); batches over x[fit_rows]
        x = torch.from_numpy(np.array(feats))
        y = torch.from_numpy(labels)
        x_fit, y_fit = x[torch.from_numpy(rows)], y[torch.from_numpy(rows)]

        def batches(epoch: int):
            g = torch.Generator().manual_seed(epoch)
            perm = torch.randperm(len(y_fit), generator=g)
            for i in range(len(y_fit) // batch):
                idx = perm[i * batch : (i + 1) * batch]
                yield x_fit[idx], y_fit[idx]

    with torch.no_grad():
        for xb, _ in batches(0):
            head(xb)
    seconds = time.perf_counter() - start
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--child", nargs=2, metavar=("CACHE", "WAY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_epoch(args.child[0], args.child[1], args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "features.npy")
        f = np.lib.format.open_memmap(cache, "w+", np.float32, (args.rows, args.dim))
        for s in range(0, args.rows, 65536):
            f[s : s + 65536] = np.random.default_rng(s).standard_normal(
                (min(65536, args.rows - s), args.dim), dtype=np.float32
            )
        f.flush()
        del f
        size = args.rows * args.dim * 4 / 2**20
        out = {}
        for way in ("in_memory", "memmap"):
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--child", cache, way]
            out[way] = json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
    ref, ours = out["in_memory"], out["memmap"]
    print(f"cache {args.rows} x {args.dim} float32 = {size:.0f} MiB, batch {args.batch}")
    print(f"in-memory (before): peak RSS {ref['peak_rss_mib']:.0f} MiB, {ref['seconds']:.2f} s")
    print(f"memmap (toolkit):   peak RSS {ours['peak_rss_mib']:.0f} MiB, {ours['seconds']:.2f} s")
    print(f"peak RSS ratio {ref['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x less, "
          f"time ratio {ours['seconds'] / ref['seconds']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
