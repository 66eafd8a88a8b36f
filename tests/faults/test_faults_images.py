"""Hostile images through ``SafeImageFolder`` (every image entrypoint reads through it): corrupt,
zero-byte, decompression bombs are skipped with a warning naming the file; grayscale, CMYK and
16-bit images are read as the picture they hold."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ijepa_toolkit.data.folder import SafeImageFolder, collate_skip_none
from ijepa_toolkit.data.transforms import eval_transform


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` RGB pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "a" / "good.png")
    return root


def read_all(root: Path) -> tuple[SafeImageFolder, list]:
    ds = SafeImageFolder(root, transform=eval_transform(16, crop_ratio=1.0))
    return ds, [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize(
    "name, writer, reason",
    [
        ("zero.png", lambda p: p.write_bytes(b""), "cannot identify image file"),
        ("cut.png", lambda p: p.write_bytes(Path(p.parent / "good.png").read_bytes()[:60]),
         "truncated"),
        # above PIL's hard limit (2 x MAX_IMAGE_PIXELS): refused when the header is read
        ("bomb.png", lambda p: png_header_only(p, 20000, 20000), "decompression bomb"),
        # between the warning and the hard limit PIL only warns and would decode 430 MB
        ("warn_bomb.png", lambda p: png_header_only(p, 12000, 12000), "decompression bomb"),
    ],
)  # fmt: skip
def test_bad_image_is_skipped_naming_file_and_reason(folder, name, writer, reason, caplog):
    writer(folder / "a" / name)
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        ds, items = read_all(folder)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith(name)][0]
    assert items[bad] is None and sum(x is not None for x in items) == 1
    line = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert line and reason in line[0].lower(), line
    batch = collate_skip_none(items)  # the batch is one image shorter, nothing crashes
    assert batch[0].shape == (1, 3, 16, 16)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_skip_none)
    assert sum(len(b[1]) for b in loader) == 1


def test_bad_image_raises_when_asked(folder):
    png_header_only(folder / "a" / "bomb.png", 12000, 12000)
    ds = SafeImageFolder(folder, on_error="raise")
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("bomb.png")][0]
    with pytest.raises(OSError, match="bomb.png: unreadable image"):
        ds[idx]


def test_grayscale_cmyk_and_16bit_are_read_as_their_picture(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 1, 16), (16, 1))  # left dark, right bright
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(root / "a" / "gray.png")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(root / "a" / "deep.png")
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[..., 3] = ((1 - ramp) * 255).round().astype(np.uint8)  # black ink fades out
    Image.fromarray(cmyk, mode="CMYK").save(root / "a" / "cmyk.tif")
    with Image.open(root / "a" / "deep.png") as im:
        assert im.mode.startswith("I")  # really 16-bit on disk
    ds = SafeImageFolder(root, transform=None)
    for i, (path, _) in enumerate(ds.samples):
        img, _ = ds[i]
        rgb = np.asarray(img, dtype=np.float64)
        assert img.mode == "RGB" and rgb.shape == (16, 16, 3), path
        assert np.allclose(rgb[..., 0], rgb[..., 2]), path  # neutral grey
        # the ramp survives: 16-bit values are scaled to 8 bits, not clipped to white
        assert np.abs(rgb[..., 0] / 255 - ramp).max() < 0.02, (path, rgb[0, :, 0])
        assert torch.is_tensor(eval_transform(16, crop_ratio=1.0)(img))
