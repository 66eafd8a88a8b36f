"""``make bench``: every comparison against the real alternatives in one run, then one table.

Sections (``--only`` picks some): ``extract`` (bench/extract.py: toolkit vs plain timm +
torchvision and Hugging Face ``IJepaModel``), ``knn`` (bench/knn.py: vs faiss and scikit-learn),
``pretrain`` (bench/pretrain_step.py: vs the official code's step, given ``--official-src DIR`` or
``IJEPA_OFFICIAL_SRC``; one thread, as the issue measured), ``logistic``
(bench/logistic_solvers.py: vs scikit-learn's lbfgs and cyanure). A contender that is not
installed (or the official checkout, when not given) is a row saying it was skipped. Every row
prints both figures and the toolkit's speed-up; the table at the end repeats them with the machine
(CPU model, cores, torch version, load average).

Sizes (``--size full``, the default, under 20 minutes on the 2-core CPU machine): extraction
ViT-B/16 at 224 on 24 synthetic JPEG photos (batch 8; a checked run, then 2 timed runs each);
kNN 50,000 x 1024 bank, 10,000 queries, 1000 classes; pretraining steps ViT-Ti/16 and ViT-S/16
at 224, batch 8 (8 and 4 timed steps each, in turn); logistic 5000 x 512, 200 classes.
``--size tiny``: seconds, for the test that keeps this script from rotting.

    python bench/all.py [--size full|tiny] [--only extract knn pretrain logistic]
        [--official-src /path/to/ijepa]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/
import extract  # noqa: E402
import knn  # noqa: E402
import logistic_solvers  # noqa: E402
import pretrain_step  # noqa: E402
from contenders import Row, machine, table  # noqa: E402

TINY_PRETRAIN = [  # a 2-block width-64 encoder at 32 px (bench/device.py's tiny size)
    "model.patch_size=4", "model.arch={embed_dim: 64, depth: 2, num_heads: 4}",
    "model.pred_depth=1", "model.pred_emb_dim=32", "mask.min_keep=4",
]  # fmt: skip
SIZES = {
    "full": {
        "extract": dict(size="base", images=24, batch=8, rounds=6),
        "knn": dict(n_train=50_000, n_test=10_000, dim=1024, classes=1000),
        "pretrain": [dict(model="vit_tiny", rounds=16), dict(model="vit_small", rounds=10)],
        "logistic": dict(n=5000, dim=512, classes=200),
    },
    "tiny": {
        "extract": dict(size="tiny", images=4, batch=2, rounds=1),
        "knn": dict(n_train=1000, n_test=100, dim=32, classes=10),
        "pretrain": [dict(model="vit_tiny", rounds=1, size=32, extra=TINY_PRETRAIN)],
        "logistic": dict(n=200, dim=16, classes=5, cap_s=5.0),
    },
}
SECTIONS = ("extract", "knn", "pretrain", "logistic")


def pretrain_rows(runs: list, src: Optional[Path]) -> list[Row]:
    """The pretraining comparisons at one thread (the thread count is restored after)."""
    threads, rows = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        for kw in runs:
            rows += pretrain_step.compare(src=src, **kw)
    finally:
        torch.set_num_threads(threads)
    return rows


def section(name: str, work: Callable[[], list]) -> list[Row]:
    """``work()``'s rows, printed as they come; a failure is one row naming the error."""
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        rows = work()
    except Exception as e:  # reported in the table; the exit status says so
        traceback.print_exc()
        rows = [Row(name, "(all)", skipped=f"failed: {type(e).__name__}: {e}")]
    for row in rows:
        print(row.line(), flush=True)
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--official-src", type=Path, default=None,
                   help="facebookresearch/ijepa checkout (the folder holding src/); default "
                   "$IJEPA_OFFICIAL_SRC")  # fmt: skip
    a = p.parse_args(argv)
    sizes, start = SIZES[a.size], time.perf_counter()
    src = pretrain_step.official_src(a.official_src)
    print(machine(), flush=True)
    work = {
        "extract": lambda: extract.compare(**sizes["extract"]),
        "knn": lambda: knn.compare(**sizes["knn"]),
        "pretrain": lambda: pretrain_rows(sizes["pretrain"], src),
        "logistic": lambda: logistic_solvers.compare(**sizes["logistic"]),
    }
    rows = [r for name in SECTIONS if name in a.only for r in section(name, work[name])]
    print(f"\n{machine()}; {time.perf_counter() - start:.0f} s in all\n")
    print(table(rows))
    return 1 if any(r.skipped.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
