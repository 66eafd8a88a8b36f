"""Feature-extraction speed of a ViT-B/16 at 224: the toolkit's ``extract_to`` (timm blocks with
fused attention, inference mode, streaming into a memory-mapped file) against an official-style
reference forward (the I-JEPA repository's manual attention ``softmax(q k^T * scale) v``, no_grad,
features kept in memory), same weights, same images. Prints both times, the ratio and the
largest feature difference.

    python bench/extract.py [--images 32 --batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.eval.features import extract_to
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for reference.py
from reference import RefEncoder  # noqa: E402


@torch.no_grad()
def reference_features(ref: RefEncoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) images -> (B, D) mean of final-norm tokens of the official-style encoder."""
    return ref(images).mean(dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    arch = EncoderArch(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    enc = create_encoder(arch).eval()
    images = torch.randn(args.images, 3, 224, 224)
    dataset = TensorDataset(images, torch.zeros(args.images, dtype=torch.long))
    ref_enc = RefEncoder.copy_of(enc).eval()  # same weights, manual attention (after the images)
    print(f"ViT-B/16 at 224, {args.images} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    reference_features(ref_enc, images[:2])  # warm-up both paths
    with torch.inference_mode():
        enc(images[:2])

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_to(enc, dataset, Path(tmp) / "f", "last", DistInfo(), args.batch_size)
        t_ours = time.perf_counter() - start
        ours = np.load(Path(tmp) / "f" / "features.npy")
    start = time.perf_counter()
    ref = torch.cat(
        [reference_features(ref_enc, x) for x, _ in DataLoader(dataset, args.batch_size)]
    )
    t_ref = time.perf_counter() - start
    diff = float(np.abs(ours - ref.numpy()).max())
    print(f"toolkit extract_to: {t_ours:.2f} s ({args.images / t_ours:.2f} img/s)")
    print(f"official-style reference forward: {t_ref:.2f} s ({args.images / t_ref:.2f} img/s)")
    print(f"reference / toolkit time: {t_ref / t_ours:.2f} (target >= 1); max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
