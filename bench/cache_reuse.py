"""Cost of reusing a feature-cache entry: the old check (SHA-256 of both ``.npy`` files on every
reuse) against the O(1) check (``meta.json``, the ``.npy`` headers, the file sizes), on
synthetic concat4 ViT-H-wide entries (D = 5120) of two sizes. Also the opt-in full check
(``features.verify=full``: every chunk re-hashed). Page cache warm (the entry was just written).

    python bench/cache_reuse.py [--sizes-gb 0.5 2.5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ijepa_toolkit.eval.cache import (
    CHUNK_BYTES,
    PartialEntry,
    chunk_bounds,
    chunk_rows,
    open_entry,
)
from ijepa_toolkit.io.read import file_sha256

DIM = 5120


def build_entry(cache: Path, key: str, gb: float) -> Path:
    """A published entry of about ``gb`` GB written through the cache's own chunk writer."""
    n = int(gb * 1e9 / (DIM * 4))
    partial = PartialEntry.of(cache, key)
    plan = partial.prepare(n, DIM, chunk_rows(DIM, 128, CHUNK_BYTES))
    for i, (a, b) in enumerate(chunk_bounds(n, plan["chunk"])):
        feats = np.full((b - a, DIM), float(i), np.float32)
        partial.write_chunk(plan, i, feats, np.arange(a, b, dtype=np.int64) % 1000)
    partial.publish(cache / key, {"synthetic": True})
    return cache / key


def old_check(entry: Path) -> bool:
    """The check every reuse paid before: headers + SHA-256 of both arrays (whole files)."""
    meta = json.loads((entry / "meta.json").read_text())
    for name in ("features", "labels"):
        np.load(entry / f"{name}.npy", mmap_mode="r")
        file_sha256(entry / f"{name}.npy")
    return meta["key"] == entry.name


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(gb: float, folder: str) -> None:
    """Build an entry of ``gb`` GB in a fresh folder under ``folder``, time the checks, clean up."""
    cache = Path(tempfile.mkdtemp(prefix="cache_reuse_", dir=folder))
    try:
        key = f"bench{int(gb * 1000)}"
        entry = build_entry(cache, key, gb)
        size = sum(p.stat().st_size for p in entry.iterdir()) / 2**30
        assert open_entry(entry, key)[0] is not None
        old = timed(lambda: old_check(entry), 3)
        new = timed(lambda: open_entry(entry, key), 20)
        full = timed(lambda: open_entry(entry, key, full=True), 1)
        print(f"entry {size:.2f} GiB: old check {old:.3f} s, O(1) check {new * 1e3:.3f} ms "
              f"({old / new:.0f}x less), full check {full:.3f} s")  # fmt: skip
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.5])
    parser.add_argument("--dir", default="/tmp", help="where the synthetic caches are built")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"python {platform.python_version()}, numpy {np.__version__}")  # fmt: skip
    for gb in args.sizes_gb:
        bench_size(gb, args.dir)


if __name__ == "__main__":
    main()
