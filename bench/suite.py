"""The frozen-feature suite (kNN + logistic + linear probe) on one dataset: one shared feature
cache against extracting per protocol (a fresh cache for each), same encoder and images.
scikit-learn's digits at 64 px, a random-init ViT (width 192, depth 12, patch 8). Prints both
times and the ratio.

    python bench/suite.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import knn_eval  # noqa: E402
import logistic_eval  # noqa: E402
import main_linprobe  # noqa: E402
from ijepa_toolkit.data.digits import build_digits_imagefolder  # noqa: E402

ARCH = "model.arch={img_size: 64, patch_size: 8, embed_dim: 192, depth: 12, num_heads: 3}"
PROTOCOLS = (
    (knn_eval, []),
    (logistic_eval, ["logistic.lambd=[0.01,0.1,1.0]"]),
    (main_linprobe, ["optimization.epochs=20", "optimization.batch_size=128"]),
)


def suite(root: Path, shared: bool) -> float:
    train, val = build_digits_imagefolder(root / "digits", size=64)
    common = [
        f"data.train_folder={train}", f"data.val_folder={val}", "data.img_size=64",
        "data.crop_ratio=1.0", "data.num_workers=0", "data.batch_size=64", "model.checkpoint=null",
        ARCH, "logging.tensorboard=false",
    ]  # fmt: skip
    start = time.perf_counter()
    for i, (module, extra) in enumerate(PROTOCOLS):
        cache = root / ("cache" if shared else f"cache{i}")
        module.main([*common, f"features.cache_dir={cache}", f"logging.folder={root / str(i)}",
                     *extra])  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t_shared = suite(Path(tmp) / "shared", shared=True)
        t_each = suite(Path(tmp) / "each", shared=False)
    print(f"suite with one shared cache: {t_shared:.1f} s")
    print(f"suite extracting per protocol: {t_each:.1f} s")
    print(f"speed-up: {t_each / t_shared:.2f}x (target >= 2.5)")


if __name__ == "__main__":
    main()
