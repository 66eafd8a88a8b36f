"""A flipped bit inside a checkpoint weight is one ``CheckpointError`` naming the file and record.

torch.load does not check the zip records' CRC-32; the loader checks those of the records it
reads, and files the toolkit writes carry a ``.sha256`` sidecar checked on every read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ijepa_toolkit import load_encoder, load_predictor
from ijepa_toolkit.errors import CheckpointError
from ijepa_toolkit.export import export_encoder
from ijepa_toolkit.io.read import read_checkpoint
from ijepa_toolkit.io.save import save_checkpoint, sidecar

QKV = "module.blocks.1.attn.qkv.weight"


def _flip_bit_inside(path: Path, tensor: torch.Tensor, byte: int = 101) -> None:
    """Flip the top bit of one byte of ``tensor``'s stored bytes, found by content."""
    data = bytearray(path.read_bytes())
    start = data.find(tensor.contiguous().numpy().tobytes())
    assert start > 0
    data[start + byte] ^= 0x80
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path, official_ckpt) -> tuple[Path, dict]:
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint(official_ckpt, path)
    return path, official_ckpt


def test_save_records_the_sha256_of_the_bytes_written(saved):
    path, _ = saved
    digest, name = sidecar(path).read_text().split()
    assert name == path.name and digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_flipped_bit_in_a_read_record_fails_its_crc(saved):
    path, ckpt = saved
    sidecar(path).unlink()  # e.g. a release downloaded without it: the zip CRCs still catch it
    _flip_bit_inside(path, ckpt["target_encoder"][QKV])
    with pytest.raises(CheckpointError) as err:
        load_encoder(path, num_heads=4)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path}: corrupt: record '")
    assert "/data/" in line and f"target_encoder/{QKV}" in line and "CRC-32" in line
    load_encoder(path, which="encoder", num_heads=4)  # records not read are not checked
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_checkpoint(path)  # resuming reads every record


def test_flipped_bit_with_sidecar_fails_the_sha256_and_names_the_record(saved):
    path, ckpt = saved
    _flip_bit_inside(path, ckpt["predictor"]["module.predictor_blocks.0.attn.qkv.weight"])
    for load in (lambda: load_encoder(path, num_heads=4), lambda: load_predictor(path, 4)):
        with pytest.raises(CheckpointError) as err:
            load()
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"{path}: corrupt: its SHA-256 differs")
        assert "/data/" in line and "fails its CRC-32" in line


def test_intact_files_load_unchanged(saved, target_encoder, images):
    path, _ = saved
    with torch.no_grad():
        assert torch.equal(
            load_encoder(path, num_heads=4).forward_features(images),
            target_encoder.forward_features(images),
        )
    sidecar(path).unlink()
    assert set(read_checkpoint(path)) == {
        "encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss",
        "batch_size", "world_size", "lr",
    }  # fmt: skip


def test_export_is_verified_by_its_sidecar(tmp_path, ckpt_path):
    out = tmp_path / "tiny.safetensors"
    export_encoder(ckpt_path, out, num_heads=4)
    assert sidecar(out).read_text().split()[0] == hashlib.sha256(out.read_bytes()).hexdigest()
    data = bytearray(out.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes
    out.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: its SHA-256 differs"):
        load_encoder(out)
