"""The frozen-feature suite (kNN + logistic + linear probe) on one dataset: one shared feature
cache against extracting per protocol (a fresh cache for each), same encoder and images.
scikit-learn's digits at 64 px, a random-init ViT (depth 12, patch 8, width 384 = ViT-S by
default). Prints wall and CPU times of both and the ratios.

    python bench/suite.py [--width 192]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.eval import knn as knn_eval
from ijepa_toolkit.eval import linear as main_linprobe
from ijepa_toolkit.eval import logistic as logistic_eval

ARCH = (
    "model.arch={{img_size: 64, patch_size: 8, embed_dim: {width}, depth: 12, num_heads: {heads}}}"
)
PROTOCOLS = (
    (knn_eval, []),
    (logistic_eval, ["logistic.lambd=[0.01,0.1,1.0]"]),
    (main_linprobe, ["optimization.epochs=20", "optimization.batch_size=128"]),
)


def common_args(root: Path, width: int) -> list[str]:
    train, val = build_digits_imagefolder(root / "digits", size=64)
    return [
        f"data.train_folder={train}", f"data.val_folder={val}", "data.img_size=64",
        "data.crop_ratio=1.0", "data.num_workers=0", "data.batch_size=64", "model.checkpoint=null",
        ARCH.format(width=width, heads=width // 64), "logging.tensorboard=false",
    ]  # fmt: skip


def suite(root: Path, shared: bool, width: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the three protocols in a row."""
    common = common_args(root, width)
    wall, cpu = 0.0, 0.0
    for i, (module, extra) in enumerate(PROTOCOLS):
        cache = root / ("cache" if shared else f"cache{i}")
        start, start_cpu = time.perf_counter(), time.process_time()
        module.main([*common, f"features.cache_dir={cache}", f"logging.folder={root / str(i)}",
                     *extra])  # fmt: skip
        took, took_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        print(f"  {module.__name__} ({'shared cache' if shared else 'own cache'}): "
              f"{took:.1f} s wall, {took_cpu:.1f} s CPU")  # fmt: skip
        wall, cpu = wall + took, cpu + took_cpu
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=384, help="encoder width (multiple of 64)")
    width = parser.parse_args().width
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warmup"  # first-use costs (kernels, allocator) stay out of the timing
        logistic_eval.main([*common_args(warm, width), f"features.cache_dir={warm / 'c'}",
                            f"logging.folder={warm / 'run'}", "subset.per_class=5"])  # fmt: skip
        each = suite(Path(tmp) / "each", shared=False, width=width)
        shared = suite(Path(tmp) / "shared", shared=True, width=width)
    print(f"suite extracting per protocol: {each[0]:.1f} s wall, {each[1]:.1f} s CPU")
    print(f"suite with one shared cache: {shared[0]:.1f} s wall, {shared[1]:.1f} s CPU")
    print(
        f"speed-up: {each[0] / shared[0]:.2f}x wall, {each[1] / shared[1]:.2f}x CPU (target >= 2.5)"
    )


if __name__ == "__main__":
    main()
