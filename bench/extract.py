"""Feature extraction from a folder of JPEG photos: the toolkit against the real alternatives, on
the same weights and the same files.

One random-init encoder is saved as an official-layout checkpoint; every contender starts from that
file the way its users would:

- toolkit: ``load_encoder`` + ``eval.features.encode_folder`` (its image folder, resize 256 bicubic,
  center crop 224, inference mode);
- plain timm + torchvision: ``ijepa-export`` (timm format) -> ``timm.create_model`` with the
  exported spec, ``torchvision.datasets.ImageFolder`` with the same torchvision transforms, a
  ``DataLoader`` and ``forward_features(x).mean(1)``;
- Hugging Face transformers as its docs show: ``ijepa-export --format hf`` ->
  ``IJepaModel.from_pretrained`` and a ``ViTImageProcessor`` (the processor transformers maps
  ``ijepa`` to; 224 x 224 bicubic resize, ImageNet mean/std) on the PIL images,
  ``last_hidden_state.mean(1)``. Its resize differs from the center crop, so a second row runs the
  same ``IJepaModel`` on the toolkit's preprocessed tensors: that one must give the same features.

The images are synthetic photos (smooth colour fields, edges and noise) written as JPEG to a
temporary folder. Prints the median seconds of each (timed in turn), the ratios, the largest
feature difference against the toolkit, and the machine.

    python bench/extract.py [--model base --images 24 --batch-size 8 --rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for contenders.py
from contenders import Row, alternating, machine, missing  # noqa: E402

SIZES = {  # name: (img_size, patch, width, depth, heads)
    "base": (224, 16, 768, 12, 12),
    "small": (224, 16, 384, 12, 6),
    "tiny": (32, 8, 64, 2, 4),
}


def write_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` synthetic 4:3 JPEG photos (two class folders) under ``folder``; returns it."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = int(rng.integers(240, 360)), int(rng.integers(320, 480))
        low = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).filter(ImageFilter.SHARPEN)
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img.save(folder / f"c{i % 2}" / f"{i:04d}.jpg", quality=90)
    return folder


def save_checkpoint(path: Path, size: str) -> None:
    """A random-init encoder (seed 0) as an official-layout checkpoint (``target_encoder``)."""
    from ijepa_toolkit.models.vit import EncoderArch, create_encoder

    img, patch, width, depth, heads = SIZES[size]
    torch.manual_seed(0)
    enc = create_encoder(EncoderArch(img, patch, width, depth, heads))
    state = {f"module.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"target_encoder": state, "encoder": state, "epoch": 0}, path)


def torchvision_transform(img_size: int):
    """The toolkit's evaluation transform written with torchvision alone."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from ijepa_toolkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([
        transforms.Resize(round(img_size / 0.875), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def toolkit_fn(ckpt: Path, folder: Path, size: str, batch: int) -> Callable[[], np.ndarray]:
    from ijepa_toolkit.eval.features import EvalDataSection, encode_folder
    from ijepa_toolkit.loader import load_encoder

    img_size, heads = SIZES[size][0], SIZES[size][4]
    enc = load_encoder(ckpt, num_heads=heads)
    data = EvalDataSection(img_size=img_size, batch_size=batch, num_workers=0)
    return lambda: encode_folder(enc, str(folder), data).feats


def loader_of(folder: Path, img_size: int, batch: int):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    return DataLoader(ImageFolder(str(folder), torchvision_transform(img_size)), batch_size=batch)


def timm_fn(ckpt: Path, out: Path, folder: Path, size: str, batch: int):
    import timm

    from ijepa_toolkit.export import export_encoder

    img_size, heads = SIZES[size][0], SIZES[size][4]
    spec = export_encoder(ckpt, out / "enc.safetensors", num_heads=heads)
    overlay = dict(spec["pretrained_cfg_overlay"], file=str(out / "enc.safetensors"))
    model = timm.create_model(spec["architecture"], pretrained=True,
                              pretrained_cfg_overlay=overlay, **spec["kwargs"]).eval()  # fmt: skip

    @torch.inference_mode()
    def run() -> np.ndarray:
        loader = loader_of(folder, img_size, batch)
        return torch.cat([model.forward_features(x).mean(dim=1) for x, _ in loader]).numpy()

    return run


def hf_fns(ckpt: Path, out: Path, folder: Path, size: str, batch: int):
    """(docs path: PIL + ViTImageProcessor + IJepaModel, IJepaModel on the toolkit's tensors)."""
    from PIL import Image
    from transformers import IJepaModel, ViTImageProcessor
    from transformers.utils import logging as hf_logging

    from ijepa_toolkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ijepa_toolkit.export import export_encoder

    img_size, heads = SIZES[size][0], SIZES[size][4]
    export_encoder(ckpt, out / "hf", num_heads=heads, fmt="hf")
    hf_logging.disable_progress_bar()  # (its weight-loading bar)
    model = IJepaModel.from_pretrained(out / "hf").eval()
    processor = ViTImageProcessor(size={"height": img_size, "width": img_size},
                                  resample=Image.BICUBIC, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD))  # fmt: skip
    files = sorted(folder.glob("*/*.jpg"))

    @torch.inference_mode()
    def docs() -> np.ndarray:
        feats = []
        for s in range(0, len(files), batch):
            images = [Image.open(f).convert("RGB") for f in files[s : s + batch]]
            inputs = processor(images, return_tensors="pt")
            feats.append(model(**inputs).last_hidden_state.mean(dim=1))
        return torch.cat(feats).numpy()

    @torch.inference_mode()
    def same_tensors() -> np.ndarray:
        loader = loader_of(folder, img_size, batch)
        feats = [model(pixel_values=x).last_hidden_state.mean(1) for x, _ in loader]
        return torch.cat(feats).numpy()

    return docs, same_tensors


def compare(size: str = "base", images: int = 24, batch: int = 8, rounds: int = 2) -> list[Row]:
    """Rows of toolkit vs each installed contender (seconds for ``images`` photos)."""
    bench = f"extraction ViT-{size} ({images} JPEGs)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_photos(tmp / "photos", images)
        save_checkpoint(tmp / "ckpt.pth.tar", size)
        fns = {"toolkit": toolkit_fn(tmp / "ckpt.pth.tar", folder, size, batch)}
        rows, checks = [], {}
        fns["timm + torchvision"] = timm_fn(tmp / "ckpt.pth.tar", tmp, folder, size, batch)
        checks["timm + torchvision"] = True
        reason = missing("transformers")
        if reason:
            rows.append(Row(bench, "HF IJepaModel", skipped=reason))
        else:
            docs, same = hf_fns(tmp / "ckpt.pth.tar", tmp, folder, size, batch)
            fns["HF IJepaModel + ViTImageProcessor (docs)"] = docs
            fns["HF IJepaModel, same tensors"] = same
            checks["HF IJepaModel, same tensors"] = True
        outs = {k: fn() for k, fn in fns.items()}  # (also each one's warm-up run)
        diffs = {k: float(np.abs(outs[k] - outs["toolkit"]).max()) for k in checks}
        times = {k: wall for k, (wall, _) in alternating(fns, rounds, warmup=0).items()}
    for name, t in times.items():
        if name != "toolkit":
            note = f"max |feature diff| {diffs[name]:.1e}" if name in diffs else "other resize"
            rows.append(Row(bench, name, "s", times["toolkit"], t, note=note))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SIZES), default="base")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each contender, in turn")
    a = p.parse_args(argv)
    print(machine())
    for row in compare(a.model, a.images, a.batch_size, a.rounds):
        print(row.line())


if __name__ == "__main__":
    main()
