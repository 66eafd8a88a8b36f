"""``export_encoder`` writes weights that plain timm rebuilds into the same model, offline."""

from __future__ import annotations

import json
import socket

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from ijepa_toolkit import CheckpointError, export_encoder


@pytest.fixture
def offline(monkeypatch):
    """No hub, and any network connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["target_encoder", "encoder"])
@torch.no_grad()
def test_plain_timm_rebuilds_the_encoder(
    tmp_path, ckpt_path, images, offline, which, target_encoder, context_encoder
):
    ours = target_encoder if which == "target_encoder" else context_encoder
    out = tmp_path / "export" / "enc.safetensors"
    spec = export_encoder(ckpt_path, out, which=which, num_heads=4)
    assert out.is_file()
    spec_path = tmp_path / "export" / "enc.json"
    assert spec_path.is_file()
    assert json.loads(spec_path.read_text()) == json.loads(json.dumps(spec))

    model = timm.create_model(
        spec["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        **spec["kwargs"],
    ).eval()
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert _same(model.forward_features(images), ours.forward_features(images))
    assert _same(model(images), ours(images))

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["which"] == which
        assert set(f.keys()) == set(ours.state_dict())


@torch.no_grad()
def test_spec_overlay_gives_strict_loading_and_right_preprocessing(
    tmp_path, ckpt_path, images, offline, target_encoder
):
    out = tmp_path / "enc.safetensors"
    spec = export_encoder(ckpt_path, out, num_heads=4)
    json_spec = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(
        json_spec["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(json_spec["pretrained_cfg_overlay"], file=str(out)),
        **json_spec["kwargs"],
    ).eval()
    assert _same(model(images), target_encoder(images))
    cfg = resolve_data_config({}, model=model)
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert spec["kwargs"]["num_heads"] == 4 and spec["kwargs"]["class_token"] is False

    # with the overlay timm matches keys strictly: a file missing a tensor is refused
    tensors = load_file(str(out))
    del tensors["blocks.0.attn.proj.bias"]
    save_file(tensors, str(out))
    with pytest.raises(RuntimeError, match="blocks.0.attn.proj.bias"):
        timm.create_model(
            json_spec["architecture"],
            pretrained=True,
            pretrained_cfg_overlay=dict(json_spec["pretrained_cfg_overlay"], file=str(out)),
            **json_spec["kwargs"],
        )


def test_export_overwrites_and_leaves_no_temp_files(tmp_path, ckpt_path):
    out = tmp_path / "enc.safetensors"
    export_encoder(ckpt_path, out, which="encoder", num_heads=4)
    export_encoder(ckpt_path, out, num_heads=4)
    names = ["enc.json", "enc.safetensors", "enc.safetensors.sha256"]  # sidecar: io/save.py
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["which"] == "target_encoder"


def test_export_errors(tmp_path, ckpt_path):
    with pytest.raises(CheckpointError, match="num_heads"):
        export_encoder(ckpt_path, tmp_path / "enc.safetensors")
    with pytest.raises(ValueError, match=".json"):
        export_encoder(ckpt_path, tmp_path / "enc.json", num_heads=4)
    with pytest.raises(CheckpointError, match="no such file"):
        export_encoder(tmp_path / "missing.pth", tmp_path / "enc.safetensors")
    assert list(tmp_path.iterdir()) == []


@torch.no_grad()
@pytest.mark.parametrize("batchnorm", [False, True])
def test_finetuned_classifier_exports_to_timm_with_its_head(
    tmp_path, ckpt_path, images, offline, batchnorm, target_encoder
):
    from ijepa_toolkit import load_encoder, save_checkpoint
    from ijepa_toolkit.models.heads import EncoderClassifier

    clf = EncoderClassifier(load_encoder(ckpt_path, num_heads=4), 5, batchnorm=batchnorm)
    torch.manual_seed(0)
    for name, t in clf.head.state_dict().items():  # a trained-looking head and BN statistics
        if t.is_floating_point():
            t.copy_(torch.rand_like(t) + 0.5 if "var" in name else torch.randn_like(t))
    path = tmp_path / "finetuned.pth"  # finetune/run.py's checkpoint dict
    config = {"model": {"num_heads": 4}}
    save_checkpoint({"model": clf.state_dict(), "epoch": 3, "metrics": {}, "config": config}, path)
    out = tmp_path / "clf.safetensors"
    spec = export_encoder(path, out)
    assert spec["kwargs"]["num_classes"] == 5
    model = timm.create_model(
        spec["architecture"], pretrained=True, **spec["kwargs"],
        pretrained_cfg_overlay=dict(spec["pretrained_cfg_overlay"], file=str(out)),
    ).eval()  # fmt: skip
    logits = clf.eval()(images)
    assert model(images).shape == (len(images), 5)
    assert (model(images) - logits).abs().max() <= 1e-5 * logits.abs().max()


def test_concat4_head_has_no_timm_export(tmp_path, ckpt_path):
    from ijepa_toolkit import load_encoder, save_checkpoint
    from ijepa_toolkit.models.heads import EncoderClassifier

    clf = EncoderClassifier(load_encoder(ckpt_path, num_heads=4), 5, pool="concat4")
    path = tmp_path / "finetuned.pth"
    save_checkpoint({"model": clf.state_dict(), "config": {"model": {"num_heads": 4}}}, path)
    with pytest.raises(CheckpointError, match="concat4"):
        export_encoder(path, tmp_path / "clf.safetensors")
