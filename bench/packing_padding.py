"""Padding rate of the packer: ``python bench/packing_padding.py [--steps 20]``.

Packs ``--steps`` batches of 64 random 32x32 images (longer side 16-32 px, patch 4, rows of
256 context + 64 target tokens) with and without carry-over and prints the mean padding rate.
"""

from __future__ import annotations

import argparse

import torch

from ijepa_toolkit.pretrain.packing import PackingSection, PackingStream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ctx-budget", type=int, default=256)
    parser.add_argument("--tgt-budget", type=int, default=64)
    args = parser.parse_args()
    for carry in (False, True):
        section = PackingSection(
            enabled=True, min_side=16, max_side=32, carry_over=carry,
            ctx_budget=args.ctx_budget, tgt_budget=args.tgt_budget,
        )  # fmt: skip
        stream, rates = PackingStream(4, section), []
        for step in range(args.steps):
            g = torch.Generator().manual_seed(step)
            images = list(torch.rand(64, 3, 32, 32, generator=g))
            batch, _ = stream(images, list(range(64)), g)
            rates.append(batch.padding_rate)
        print(f"carry_over={carry}: mean padding {100 * sum(rates) / len(rates):.1f}% "
              f"(min {100 * min(rates):.1f}%, max {100 * max(rates):.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
