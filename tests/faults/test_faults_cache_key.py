"""The feature-cache key covers everything that changes the numbers: images rewritten in place
with the same size, another folder with the same names and sizes, a content hash when mtimes
are restored, the effective precision, the device type and the feature-code version."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.eval import features as features_mod
from ijepa_toolkit.eval.features import (
    EvalDataSection,
    build_eval_dataset,
    cache_key,
    encode_folder,
    load_or_extract,
)
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

ARCH = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4)
DATA = EvalDataSection(img_size=16, crop_ratio=1.0, batch_size=16, num_workers=0)
IDENTITY = {"random_init": ARCH, "seed": 0}


def encoder():
    torch.manual_seed(0)
    return create_encoder(EncoderArch(**ARCH)).eval()


def bmp_folder(root: Path, seed: int) -> Path:
    """Digits as BMP (the file size depends on the image size only), pixels drawn with ``seed``."""
    train, _ = build_digits_imagefolder(root.parent / f"{root.name}_png", 16, per_class=4)
    rng = np.random.default_rng(seed)
    for src in sorted(train.rglob("*.png")):
        dst = root / src.parent.name / (src.stem + ".bmp")
        dst.parent.mkdir(parents=True, exist_ok=True)
        px = np.asarray(Image.open(src).convert("RGB"))
        if seed:
            px = rng.integers(0, 256, px.shape, dtype=np.uint8)
        Image.fromarray(px).save(dst, "BMP")
    return root


def rewrite_same_size(folder: Path, seed: int, keep_mtime: bool = False) -> None:
    """Every image rewritten in place with other pixels, same size (and mtime if asked)."""
    rng = np.random.default_rng(seed)
    for p in sorted(folder.rglob("*.bmp")):
        st, size = p.stat(), p.stat().st_size
        px = rng.integers(0, 256, np.asarray(Image.open(p)).shape, dtype=np.uint8)
        Image.fromarray(px).save(p, "BMP")
        assert p.stat().st_size == size
        if keep_mtime:
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def cached(folder: Path, cache: Path, **options):
    ds = build_eval_dataset(str(folder), DATA)
    return load_or_extract(ds, IDENTITY, encoder, "last", cache, DistInfo(), 16, **options)


def fresh(folder: Path) -> np.ndarray:
    return encode_folder(encoder(), str(folder), DATA).feats


def test_images_rewritten_in_place_with_the_same_size_are_not_reused(tmp_path):
    folder = bmp_folder(tmp_path / "a", seed=0)
    first = cached(folder, tmp_path / "cache")
    rewrite_same_size(folder, seed=1)
    again = cached(folder, tmp_path / "cache")
    assert not again.reused and again.path != first.path
    np.testing.assert_array_equal(again.feats, fresh(folder))
    assert not np.allclose(again.feats, first.feats)


def test_another_folder_with_the_same_names_and_sizes_is_not_reused(tmp_path):
    a, b = bmp_folder(tmp_path / "a", seed=0), bmp_folder(tmp_path / "b", seed=2)
    for p in a.rglob("*.bmp"):  # same names, sizes and mtimes; other pixels
        q = b / p.relative_to(a)
        assert q.stat().st_size == p.stat().st_size
        os.utime(q, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns))
    first = cached(a, tmp_path / "cache")
    other = cached(b, tmp_path / "cache")
    assert not other.reused and other.path != first.path
    np.testing.assert_array_equal(other.feats, fresh(b))


def test_content_hash_sees_rewrites_that_keep_size_and_mtime(tmp_path):
    folder = bmp_folder(tmp_path / "a", seed=0)
    first = cached(folder, tmp_path / "cache", hash_images=True)
    rewrite_same_size(folder, seed=1, keep_mtime=True)
    again = cached(folder, tmp_path / "cache", hash_images=True)
    assert not again.reused and again.path != first.path
    np.testing.assert_array_equal(again.feats, fresh(folder))
    shutil.copytree(folder, tmp_path / "moved")  # same bytes elsewhere: the hash key reuses
    assert cached(tmp_path / "moved", tmp_path / "cache", hash_images=True).path == again.path


def test_precision_device_and_code_version_are_in_the_key(tmp_path, monkeypatch):
    ds = build_eval_dataset(str(bmp_folder(tmp_path / "a", seed=0)), DATA)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)

    def key(device, bf16):
        return cache_key(IDENTITY, "last", ds, device, bf16)[0]

    assert key(cuda, True) != key(cuda, False)  # bf16 autocast vs fp32 on CUDA
    assert key(cpu, True) == key(cpu, False)  # the CPU computes fp32 either way
    assert key(cpu, False) != key(cuda, False)
    before = key(cpu, True)
    monkeypatch.setattr(features_mod, "FEATURE_CODE_VERSION", features_mod.FEATURE_CODE_VERSION + 1)
    assert key(cpu, True) != before
