"""Feature cache: concat4 against the blocks, cache keys, reuse, corrupt entries, bad folders,
and ImageNet-style subsets."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _direct import concat4_by_hand

from ijepa_toolkit.config import EncoderSection
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.data.subsets import (
    SubsetError,
    indices_from_names,
    per_class_indices,
    read_subset_file,
)
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.eval.features import (
    EvalDataSection,
    build_eval_dataset,
    load_or_extract,
    model_identity,
)
from ijepa_toolkit.io.save import save_checkpoint
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

ARCH = dict(img_size=16, patch_size=8, embed_dim=32, depth=5, num_heads=4)
DATA = EvalDataSection(img_size=16, crop_ratio=1.0, batch_size=32, num_workers=0)
SINGLE = DistInfo()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    train, _ = build_digits_imagefolder(tmp_path_factory.mktemp("d") / "digits", 16, per_class=8)
    return train


def encoder(seed: int = 0):
    torch.manual_seed(seed)
    return create_encoder(EncoderArch(**ARCH)).eval()


def never_built():
    raise AssertionError("the encoder was built: features were extracted again")


def features(folder, cache, ckpt=None, layers="last", make=None, options=None, **data):
    """Cached features of ``folder``; ``options``: keyword arguments of ``load_or_extract``."""
    ds = build_eval_dataset(str(folder), EvalDataSection(**{**DATA.__dict__, **data}))
    section = EncoderSection(checkpoint=str(ckpt) if ckpt else None, arch=ARCH, num_heads=4)
    ident = model_identity(section, 0, cache)
    return load_or_extract(
        ds, ident, make or encoder, layers, cache, SINGLE, batch_size=32, **(options or {})
    )


def test_concat4_cached_features_equal_direct_computation(digits, tmp_path):
    fs = features(digits, tmp_path, layers="concat4")
    ds = build_eval_dataset(str(digits), DATA)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    enc = encoder()
    direct = concat4_by_hand(enc, x).numpy()
    assert fs.feats.shape == (len(ds), 4 * 32)
    np.testing.assert_allclose(fs.feats, direct, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(fs.labels, ds.targets)


def test_cache_is_reused_and_keyed_by_layers_transform_listing(digits, tmp_path):
    first = features(digits, tmp_path)
    again = features(digits, tmp_path, make=never_built)
    assert not first.reused and again.reused and again.path == first.path
    np.testing.assert_array_equal(first.feats, again.feats)
    other = [
        features(digits, tmp_path, layers="concat4"),
        features(digits, tmp_path, mean=[0.5, 0.5, 0.5]),
    ]
    shutil.copytree(digits, tmp_path / "copy")
    (tmp_path / "copy" / "0" / sorted(p.name for p in (digits / "0").iterdir())[0]).unlink()
    other.append(features(tmp_path / "copy", tmp_path))
    assert all(not o.reused for o in other)
    assert len({first.path, *(o.path for o in other)}) == 4


def test_cache_from_another_checkpoint_is_not_reused(digits, tmp_path):
    ckpt = tmp_path / "enc.pth"
    save_checkpoint({"target_encoder": encoder(0).state_dict()}, ckpt)
    a = features(digits, tmp_path / "cache", ckpt=ckpt, make=lambda: encoder(0))
    save_checkpoint({"target_encoder": encoder(1).state_dict()}, ckpt)  # same path, new weights
    b = features(digits, tmp_path / "cache", ckpt=ckpt, make=lambda: encoder(1))
    assert not b.reused and a.path != b.path
    assert not np.allclose(a.feats, b.feats)
    random_init = features(digits, tmp_path / "cache")
    assert not random_init.reused and random_init.path not in (a.path, b.path)


def test_corrupt_cache_is_reextracted_with_a_warning(digits, tmp_path, caplog):
    good = features(digits, tmp_path)
    reference = np.array(good.feats)
    path = good.path / "features.npy"
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the data: only the full check (re-hash) sees it
    path.write_bytes(bytes(raw))
    assert features(digits, tmp_path, make=never_built).reused  # O(1) check: sizes, headers
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        again = features(digits, tmp_path, options={"verify": "full"})
    assert not again.reused and "does not match its checksum" in caplog.text
    np.testing.assert_array_equal(again.feats, reference)
    path.write_bytes(path.read_bytes()[:-4])  # truncated: the default check sees it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        again = features(digits, tmp_path)
    assert not again.reused and "features.npy" in caplog.text
    np.testing.assert_array_equal(again.feats, reference)
    (good.path / "labels.npy").write_bytes(b"garbage")
    assert not features(digits, tmp_path).reused


def test_bad_folders(digits, tmp_path, caplog):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        features(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        features(tmp_path / "missing", tmp_path)
    shutil.copytree(digits, tmp_path / "bad")
    victim = next((tmp_path / "bad" / "3").iterdir())
    victim.write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        fs = features(tmp_path / "bad", tmp_path / "c")
    assert len(fs.labels) == len(build_eval_dataset(str(digits), DATA)) - 1
    assert "unreadable" in caplog.text
    for p in (tmp_path / "bad").rglob("*.png"):
        p.write_bytes(b"x")
    with pytest.raises(ValueError, match="none of the"):
        features(tmp_path / "bad", tmp_path / "c")


def imagenet_like(digits: Path, root: Path) -> Path:
    """Digits images under synset-like folders with ``n0xxxxxxx_N.JPEG`` names."""
    for c in sorted(p.name for p in digits.iterdir()):
        wnid = f"n0{int(c):07d}"
        (root / wnid).mkdir(parents=True)
        for i, src in enumerate(sorted((digits / c).iterdir())):
            shutil.copy(src, root / wnid / f"{wnid}_{i + 100}.JPEG")
    return root


def test_subset_file_parsing_and_errors(digits, tmp_path):
    root = imagenet_like(digits, tmp_path / "train")
    ds = build_eval_dataset(str(root), DATA)
    names = [f"n0{c:07d}_{100 + c % 3}.JPEG" for c in range(10)]
    listing = tmp_path / "1percent.txt"
    listing.write_text("# ten images\n" + "\n".join(names) + "\n\n")
    assert read_subset_file(listing) == names
    idx = indices_from_names(ds.samples, ds.classes, names, str(listing))
    assert sorted(Path(ds.samples[i][0]).name for i in idx) == sorted(names)
    missing = [f"n0999999{i}_1.JPEG" for i in range(8)]
    with pytest.raises(SubsetError, match=r"8 of 18 .*n09999990_1\.JPEG") as err:
        indices_from_names(ds.samples, ds.classes, names + missing, "list.txt")
    assert "n09999997_1.JPEG" not in str(err.value)  # only the first few are listed
    with pytest.raises(SubsetError, match="no images for class.*n00000009"):
        indices_from_names(ds.samples, ds.classes, names[:9], "list.txt")
    with pytest.raises(SubsetError, match="cannot read"):
        read_subset_file(tmp_path / "nope.txt")


def test_subset_names_repeated_across_classes_need_the_class_folder(digits, tmp_path):
    root = tmp_path / "same_names"  # every class holds 0.png, 1.png, ...
    for c in sorted(p.name for p in digits.iterdir()):
        (root / c).mkdir(parents=True)
        for i, src in enumerate(sorted((digits / c).iterdir())):
            shutil.copy(src, root / c / f"{i}.png")
    ds = build_eval_dataset(str(root), DATA)
    with pytest.raises(
        SubsetError,
        match=r"3 listed file names occur in several classes, e.g. "
        r"0\.png \(0/0\.png, 1/0\.png, 2/0\.png\); list them as class_folder",
    ):
        indices_from_names(ds.samples, ds.classes, [f"{i}.png" for i in range(3)], "list.txt")
    listed = [f"{c}/{int(c) % 3}.png" for c in ds.classes]  # a different image number per class
    idx = indices_from_names(ds.samples, ds.classes, listed, "list.txt")
    assert [ds.samples[i][0] for i in idx] == [str(root / n) for n in listed]


def test_per_class_subsets_are_deterministic(digits):
    ds = build_eval_dataset(str(digits), DATA)
    a = per_class_indices(ds.targets, ds.classes, 3, seed=1)
    assert a == per_class_indices(ds.targets, ds.classes, 3, seed=1)
    assert a != per_class_indices(ds.targets, ds.classes, 3, seed=2)
    assert np.bincount(np.asarray(ds.targets)[a]).tolist() == [3] * 10
    with pytest.raises(SubsetError, match="no images for class"):
        per_class_indices([t for t in ds.targets if t != 4], ds.classes, 3, seed=1)
