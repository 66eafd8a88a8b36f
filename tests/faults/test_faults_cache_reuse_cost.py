"""Issue 14, failure 3: reusing a cache entry must cost O(1), not a re-hash of its arrays.

Measured in bytes the process reads (``/proc/self/io`` ``rchar``: every ``read`` call, which is
what hashing a file does): reusing a ``concat4`` entry (4x the features of a ``last`` entry of the
same images) must read no more than reusing the small one, and far less than the arrays hold.
On the code before the fix each reuse re-hashed both ``.npy`` files with ``read`` calls, so the
bytes read grew with the entry (``features.verify=full`` re-hashes on request: tested in
test_eval_features.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.eval.features import EvalDataSection, build_eval_dataset, load_or_extract
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

ARCH = dict(img_size=16, patch_size=8, embed_dim=64, depth=4, num_heads=4)
DATA = EvalDataSection(img_size=16, crop_ratio=1.0, batch_size=64, num_workers=0)
IDENTITY = {"random_init": ARCH, "seed": 0}
IO = Path("/proc/self/io")
pytestmark = pytest.mark.skipif(not IO.exists(), reason="needs Linux /proc/self/io")


def encoder():
    torch.manual_seed(0)
    return create_encoder(EncoderArch(**ARCH)).eval()


def bytes_read() -> int:
    return int(next(line for line in IO.read_text().splitlines() if line.startswith("rchar:"))
               .split()[1])  # fmt: skip


def reuse_cost(dataset, cache: Path, layers: str, **options) -> tuple[int, int]:
    """(bytes read by one reuse of the entry, bytes of its features file)."""
    first = load_or_extract(dataset, IDENTITY, encoder, layers, cache, DistInfo(), 64)
    before = bytes_read()
    again = load_or_extract(dataset, IDENTITY, encoder, layers, cache, DistInfo(), 64, **options)
    cost = bytes_read() - before
    assert again.reused and again.path == first.path
    return cost, (first.path / "features.npy").stat().st_size


def test_reuse_reads_a_bounded_number_of_bytes_whatever_the_entry_size(tmp_path):
    train, _ = build_digits_imagefolder(tmp_path / "digits", 16, per_class=40)
    dataset = build_eval_dataset(str(train), DATA)
    small, small_size = reuse_cost(dataset, tmp_path / "cache", "last")
    large, large_size = reuse_cost(dataset, tmp_path / "cache", "concat4")
    assert large_size >= 4 * small_size - 4096
    assert large < small_size / 2, (large, small_size)  # reads no array
    assert large <= small + 16384, (small, large)  # does not grow with the entry
