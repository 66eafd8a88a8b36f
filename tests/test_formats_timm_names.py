"""timm pretrained names resolve through timm's own pretrained config to the cached file, offline.

timm 1.0's I-JEPA names (``vit_huge_patch14_gap_224.in1k_ijepa``, ...) point at the official
``.pth.tar`` releases (no ``hf_hub_id``), which timm downloads into the torch hub cache; names with
an ``hf_hub_id`` live in the huggingface_hub cache. Each test places a tiny file where timm would
have put the real one (temporary ``TORCH_HOME`` / hub cache) and never reaches the network.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from timm.models import get_pretrained_cfg
from timm.models._hub import get_cache_dir

from ijepa_toolkit import CheckpointError, export_encoder, load_encoder

NAME = "vit_huge_patch14_gap_224.in1k_ijepa"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@torch.no_grad()
@pytest.mark.parametrize("which", ["target_encoder", "encoder"])
def test_ijepa_name_loads_the_file_in_timms_cache(ckpt_path, images, which):
    url = get_pretrained_cfg(NAME).url
    cached = Path(get_cache_dir()) / Path(url).name  # where timm.create_model downloads it
    shutil.copy(ckpt_path, cached)
    enc = load_encoder(NAME, which=which, num_heads=4)
    ref = load_encoder(ckpt_path, which=which, num_heads=4)
    assert torch.equal(enc.forward_features(images), ref.forward_features(images))
    assert torch.equal(enc(images), ref(images))


def test_absent_file_says_where_to_put_it():
    with pytest.raises(CheckpointError, match=r"IN1K-vit\.h\.14-300e\.pth\.tar at .*checkpoints"):
        load_encoder(NAME)


@torch.no_grad()
def test_hub_name_loads_from_the_huggingface_cache(ckpt_path, tmp_path, images):
    name = "vit_base_patch16_224.mae"  # a name with an hf_hub_id; the layout is what counts
    repo = get_pretrained_cfg(name).hf_hub_id
    with pytest.raises(CheckpointError, match="hf_hub_download"):
        load_encoder(name)
    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    export_encoder(ckpt_path, snapshot / "model.safetensors", num_heads=4)
    enc = load_encoder(name)  # heads from the export's spec beside the file
    ref = load_encoder(ckpt_path, num_heads=4)
    assert torch.equal(enc.forward_features(images), ref.forward_features(images))


def test_a_missing_path_is_still_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_encoder(tmp_path / "nothing.pth.tar")
    with pytest.raises(CheckpointError, match="no such file"):
        load_encoder("not_a_timm_model.tag")
