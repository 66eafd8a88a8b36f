"""Hugging Face transformers I-JEPA in and out, against transformers' own ``IJepaModel``.

Both directions on random weights: ``IJepaModel.save_pretrained`` -> ``load_encoder`` and
``ijepa-export --format hf`` -> ``IJepaModel.from_pretrained``, tokens (``last_hidden_state``) and
their mean, at the native size and at another size. At another size transformers resamples its
table with bicubic ``antialias=False`` while the toolkit uses timm's ``resample_abs_pos_embed``
(``antialias=True``, another cubic kernel) or recomputes a sin-cos table; the other-size test
therefore gives both the same table (an ``IJepaModel`` built at that size) and compares the rest.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ijepa_toolkit import CheckpointError, export_encoder, inspect_checkpoint, load_encoder
from ijepa_toolkit.cli import export_main

transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
             image_size=32, patch_size=8, layer_norm_eps=1e-6)  # fmt: skip


def _hf_model(seed: int = 0, **overrides) -> transformers.IJepaModel:
    torch.manual_seed(seed)
    model = transformers.IJepaModel(transformers.IJepaConfig(**{**SIZES, **overrides}))
    with torch.no_grad():  # away from the init (unit norms, zero biases) so every tensor counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return ours.shape == ref.shape and (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "ijepa"
    _hf_model().save_pretrained(folder)
    return folder


@torch.no_grad()
@pytest.mark.parametrize("target", ["folder", "weights file"])
def test_save_pretrained_loads_with_transformers_outputs(hf_folder, target, caplog):
    model = transformers.IJepaModel.from_pretrained(hf_folder).eval()
    path = hf_folder if target == "folder" else hf_folder / "model.safetensors"
    with caplog.at_level(logging.INFO, logger="ijepa_toolkit"):
        enc = load_encoder(path)
    assert "context encoder" in caplog.text and "format=hf" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    ref = model(x).last_hidden_state
    assert _close(enc.forward_features(x), ref) and _close(enc(x), ref.mean(1))
    assert enc.arch.num_heads == 4 and enc.arch.mlp_ratio == 2.5
    assert inspect_checkpoint(path)["format"] == "hf"


@torch.no_grad()
def test_other_size_matches_transformers_given_the_same_table(hf_folder):
    enc = load_encoder(hf_folder)
    big = _hf_model(image_size=48)
    big.load_state_dict(
        {
            **transformers.IJepaModel.from_pretrained(hf_folder).state_dict(),
            "embeddings.position_embeddings": enc.pos_embed_for_grid((6, 6)),
        }
    )
    x = torch.randn(2, 3, 48, 48)
    ref = big(x).last_hidden_state
    assert _close(enc.forward_features(x), ref) and _close(enc(x), ref.mean(1))


@torch.no_grad()
def test_vit_g_mlp_and_eps_and_qkv_bias_come_from_the_config(tmp_path):
    # ViT-g's 6144 = 48/11 * 1408; here 44 = 11/4 * 16; qkv without bias; eps transformers' 1e-12
    model = _hf_model(hidden_size=16, num_attention_heads=2, intermediate_size=44,
                      qkv_bias=False, layer_norm_eps=1e-12)  # fmt: skip
    model.save_pretrained(tmp_path)
    enc = load_encoder(tmp_path)
    assert enc.arch.mlp_ratio == 44 / 16 and not enc.arch.qkv_bias
    assert enc.arch.layernorm_eps == 1e-12 and enc.arch.num_heads == 2
    x = torch.randn(2, 3, 32, 32)
    assert _close(enc.forward_features(x), model(x).last_hidden_state)


@torch.no_grad()
@pytest.mark.parametrize("which", ["target_encoder", "encoder"])
def test_export_hf_loads_in_transformers_with_equal_outputs(ckpt_path, tmp_path, which):
    out = tmp_path / "hf"
    config = export_encoder(ckpt_path, out, which=which, num_heads=4, fmt="hf")
    assert json.loads((out / "config.json").read_text()) == config
    model = transformers.IJepaModel.from_pretrained(out).eval()
    enc = load_encoder(ckpt_path, which=which, num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x).last_hidden_state
    assert _close(enc.forward_features(x), ref) and _close(enc(x), ref.mean(1))
    back = load_encoder(out)  # and back: the same encoder at another size too
    y = torch.randn(2, 3, 48, 40)
    assert torch.equal(back.forward_features(y), enc.forward_features(y))


def test_export_hf_from_the_command_line(ckpt_path, tmp_path, capsys):
    assert (
        export_main([str(ckpt_path), str(tmp_path / "o"), "--format", "hf", "--num-heads", "4"])
        == 0
    )
    assert "IJepaModel" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert names - {"model.safetensors.sha256"} == {"config.json", "model.safetensors"}


def test_config_problems_are_named(hf_folder, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.json that save_pretrained writes"):
        load_encoder(weights)
    config = json.loads((hf_folder / "config.json").read_text())
    for change, message in (({"patch_size": 4}, "patch_size=4 but the weights have 8"),
                            ({"model_type": "vit"}, "expected 'ijepa'"),
                            ({"hidden_act": "relu"}, "hidden_act='relu'")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_encoder(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="none of model.safetensors"):
        load_encoder(tmp_path)
