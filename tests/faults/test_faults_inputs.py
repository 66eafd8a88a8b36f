"""Input edge cases (issue 14, failure 8): each is one clear error naming the key or file, or a
counted, logged skip. Every test here failed on main before the fix (noted per test)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_toolkit.config import ConfigError, load_config, read_yaml
from ijepa_toolkit.configs import find_config
from ijepa_toolkit.data.folder import SafeImageFolder
from ijepa_toolkit.data.transforms import eval_transform
from ijepa_toolkit.engine.distributed import resolve_device
from ijepa_toolkit.errors import UserError
from ijepa_toolkit.eval.knn import KNNConfig
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.viz import VizConfig

SHIPPED = Path(find_config("knn/digits")).parents[1]


def save(path: Path, width: int = 8, height: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


def test_symlink_loop_in_a_class_folder_is_read_once(tmp_path, caplog):
    """Before: torchvision followed ``a/sub/loop -> ..`` until the path limit (7 -> 287)."""
    root = tmp_path / "imgs"
    for i in range(5):
        save(root / "a" / f"{i}.png")
    for i in range(2):
        save(root / "a" / "sub" / f"s{i}.png")
    os.symlink("..", root / "a" / "sub" / "loop")
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        ds = SafeImageFolder(root)
    assert len(ds) == 7 and ds.link_loops == 1
    assert len({os.path.realpath(p) for p, _ in ds.samples}) == 7
    assert "loop" in caplog.text and "symlink loop" in caplog.text


def test_symlinked_images_and_folders_still_count(tmp_path):
    """Links to files or to folders read nowhere else are ordinary images (subsets built from
    links): same samples, same order as torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    store = tmp_path / "store"
    for i in range(3):
        save(store / f"{i}.png")
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    os.symlink(store, root / "a" / "linked")
    os.symlink(store / "0.png", root / "a" / "z.png")
    save(root / "b" / "x.png")
    ds = SafeImageFolder(root)
    assert ds.samples == ImageFolder(str(root)).samples and len(ds) == 5 and ds.link_loops == 0


def test_extreme_aspect_image_is_skipped_before_decoding(tmp_path, caplog):
    """Before: a 1 x 4000 PNG (under 100 bytes) went through the eval transform as a 256 x
    1,024,000 image (750 MiB)."""
    root = tmp_path / "imgs"
    save(root / "a" / "ok.png", 16, 16)
    save(root / "a" / "strip.png", 4000, 1)
    assert (root / "a" / "strip.png").stat().st_size < 200
    ds = SafeImageFolder(root, transform=eval_transform(224))
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        items = [ds[i] for i in range(len(ds))]
    names = [Path(p).name for p, _ in ds.samples]
    assert items[names.index("strip.png")] is None
    assert items[names.index("ok.png")][0].shape == (3, 224, 224)
    assert "strip.png" in caplog.text and "4000x1 px: aspect ratio" in caplog.text


@pytest.mark.parametrize(
    "cls, name, override, key",
    [
        (KNNConfig, "knn/digits", "data.crop_ratio=0.01", "data.crop_ratio"),
        (KNNConfig, "knn/digits", "data.crop_ratio=0", "data.crop_ratio"),
        (KNNConfig, "knn/digits", "data.crop_ratio=1.5", "data.crop_ratio"),
        (KNNConfig, "knn/digits", "data.batch_size=0", "data.batch_size"),
        (KNNConfig, "knn/digits", "data.img_size=0", "data.img_size"),
        (KNNConfig, "knn/digits", "model.num_heads=0", "model.num_heads"),
        (KNNConfig, "knn/digits", "meta.device=gpu0", "meta.device"),
        (FinetuneConfig, "finetune/tiny_cpu", "data.crop_ratio=0.01", "data.crop_ratio"),
        (FinetuneConfig, "finetune/tiny_cpu", "model.num_heads=0", "model.num_heads"),
        (VizConfig, "visualize/fixture_digits", "data.crop_ratio=0", "data.crop_ratio"),
        (VizConfig, "visualize/fixture_digits", "data.img_size=0", "data.img_size"),
    ],
)  # fmt: skip
def test_bad_values_are_one_config_error_naming_the_key(cls, name, override, key):
    """Before: accepted (crop_ratio 0.01 at img_size 4096 ran out of memory), or later a
    ZeroDivisionError (crop_ratio=0, num_heads=0), a DataLoader message without the key
    (batch_size=0, img_size=0), a traceback (meta.device=gpu0)."""
    extra = ["data.img_size=4096"] if "crop_ratio=0.01" in override else []
    with pytest.raises(ConfigError, match=rf"^{key} must be .*, got "):
        load_config(cls, find_config(name), [override, *extra])


def test_eval_transform_refuses_a_crop_ratio_out_of_range():
    """Before: ``ZeroDivisionError`` at 0, a 409,600 px resize at 4096 / 0.01."""
    for ratio in (0.0, 0.01, 1.5):
        with pytest.raises(UserError, match="crop_ratio must be in"):
            eval_transform(4096, ratio)
    assert eval_transform(224, 0.5) and eval_transform(224, 1.0)


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Before: 7 levels of 9 aliases (under 300 bytes) took 9 s and 100 MB, growing x9 a level."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    began = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: line 2: YAML alias \*l0 refused"):
        load_config(KNNConfig, path)
    assert time.perf_counter() - began < 1.0


def test_shipped_configs_use_no_alias():
    files = sorted(SHIPPED.rglob("*.yaml"))
    assert len(files) > 20
    for f in files:
        read_yaml(f)  # an alias would raise


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_is_one_user_error(name):
    """Before: ``RuntimeError`` (cuda) or a torch traceback later (cuda:N)."""
    with pytest.raises(UserError, match=rf"meta.device={name}: CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", "mps0"])
def test_unknown_device_name_is_one_user_error(name):
    with pytest.raises(UserError, match="meta.device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
