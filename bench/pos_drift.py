"""Drift of a frozen sin-cos table through the official I-JEPA EMA, replayed in float32.

The official ``src/train.py`` (facebookresearch/ijepa @ 52c1ae95) updates every target
parameter, the frozen ``pos_embed`` too: ``param_k.mul_(m).add_((1 - m) * param_q)``, momentum
linear from 0.996 to 1.0 over ``ipe * epochs`` steps. This replays it on the exact table (the
context encoder's, which no optimizer touches) and prints max |target table - sin-cos|: the
figure behind ``models.pos_embed.DRIFT_ATOL``.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/pos_drift.py          # IN1K ViT-H/14: 625 x 300
    PYTHONPATH=src python bench/pos_drift.py --ipe 625 --epochs 300 --grid 16 --dim 1280
"""

from __future__ import annotations

import argparse
import time

from ijepa_toolkit.models.pos_embed import replay_official_ema, sincos_2d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ipe", type=int, default=625, help="iterations per epoch (IN1K, batch 2048)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--grid", type=int, default=16, help="patches per side (224 / 14)")
    p.add_argument("--dim", type=int, default=1280, help="encoder width (ViT-H)")
    args = p.parse_args()
    table = sincos_2d(args.dim, (args.grid, args.grid))
    steps = args.ipe * args.epochs
    start = time.perf_counter()
    drifted = replay_official_ema(table, steps, steps)
    diff = (drifted - table).abs()
    print(
        f"grid {args.grid}x{args.grid} width {args.dim}, {steps} steps: max |drift| "
        f"{diff.max().item():.4g}, mean {diff.mean().item():.3g}, "
        f"{int((diff > 1e-4).sum())} of {diff.numel()} entries > 1e-4 "
        f"({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
