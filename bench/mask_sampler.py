"""Milliseconds to draw one step's multiblock masks: default (vectorised) vs legacy (official loop).

python bench/mask_sampler.py [--grid 14] [--batch 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from ijepa_toolkit.masks.multiblock import MaskSection, MultiBlockMaskSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for legacy in (False, True):
        sampler = MultiBlockMaskSampler((args.grid, args.grid), MaskSection(legacy=legacy))
        g = None if legacy else torch.Generator().manual_seed(0)
        times = []
        for step in range(args.repeats):
            start = time.perf_counter()
            sampler.sample(args.batch, step, g)
            times.append(time.perf_counter() - start)
        name = "legacy " if legacy else "default"
        print(f"{name} {args.batch} images on {args.grid}x{args.grid}: "
              f"{1000 * min(times):.1f} ms (best of {args.repeats})")  # fmt: skip


if __name__ == "__main__":
    main()
