"""``make demo``: the toolkit end to end on data that ships with the install (no downloads).

Loads the official-format fixture checkpoint, checks it against the official model's stored
outputs, then extracts frozen features of scikit-learn's digits and prints a kNN accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import DataLoader

from .checkpoint import inspect_checkpoint, load_encoder
from .data.digits import build_digits_imagefolder
from .data.folder import SafeImageFolder, collate_skip_none
from .data.transforms import eval_transform
from .engine.logger import setup_console_logging

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "ijepa_vit_p8_d64.pth.tar"
EXPECTED = REPO / "tests" / "fixtures" / "ijepa_vit_p8_d64_expected.pt"


@torch.inference_mode()
def features(
    model: torch.nn.Module, folder: Path, img_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) pooled features and (N,) labels of an image folder."""
    ds = SafeImageFolder(folder, transform=eval_transform(img_size, crop_ratio=1.0))
    feats, labels = [], []
    for images, targets in DataLoader(ds, batch_size=256, collate_fn=collate_skip_none):
        feats.append(model(images))
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run folder (data cached inside)")
    args = parser.parse_args(argv)
    setup_console_logging()
    start = time.time()
    out = Path(args.out)

    info = inspect_checkpoint(FIXTURE)
    print(f"1. {FIXTURE.name}: format={info['format']} epoch={info['epoch']} "
          f"sub-models={list(info['submodels'])}")  # fmt: skip
    encoder = load_encoder(FIXTURE, num_heads=4)
    expected = torch.load(EXPECTED, weights_only=True)
    with torch.inference_mode():
        diff = encoder.forward_features(expected["input"]) - expected["target_encoder_tokens"]
    print(f"2. parity with the official model code: max |diff| = {diff.abs().max():.2e}")

    train, val = build_digits_imagefolder(out / "data" / "digits", size=32)
    results = {}
    for name, model in (("fixture target_encoder", encoder),):
        x_tr, y_tr = features(model, train, 32)
        x_va, y_va = features(model, val, 32)
        knn = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(x_tr, y_tr)
        results[name] = 100.0 * knn.score(x_va, y_va)
        print(f"3. digits features {tuple(x_tr.shape)} -> kNN(k=20) top-1 {results[name]:.1f}%")
    print(f"done in {time.time() - start:.1f}s (random fixture weights: accuracy is only a check)")


if __name__ == "__main__":
    main()
