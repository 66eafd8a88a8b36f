"""tiny-IJEPA checkpoints, exactly as its ``train.py`` writes them, load into the timm ViT and
compute what its own model code computes (fixture: ``tests/fixtures/tiny_ijepa/README.md``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ijepa_toolkit import CheckpointError, inspect_checkpoint, load_encoder, save_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_ijepa"
CKPT = FIXTURE / "ckpt.pt"
UPSTREAM = {"target_encoder": "target_encoder", "encoder": "context_encoder"}


@pytest.fixture(scope="module")
def outputs() -> dict:
    return load_file(FIXTURE / "outputs.safetensors")


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return ours.shape == ref.shape and (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("which", list(UPSTREAM))
@pytest.mark.parametrize("size", ["", "_24"])  # native 16x16 and 24x24 (a 6x6 grid)
def test_tiny_ijepa_matches_its_model_code(outputs, which, size):
    enc = load_encoder(CKPT, which=which)
    assert enc.arch.layernorm_eps == 1e-5 and enc.pos_embed_kind == "learned"
    assert enc.arch.num_heads == 2 and not enc.training
    x = outputs["input" + size]
    name = UPSTREAM[which]
    assert _close(enc.forward_features(x), outputs[f"{name}.tokens{size}"])
    assert _close(enc(x), outputs[f"{name}.pooled{size}"])


@torch.no_grad()
def test_the_two_encoders_differ_and_inspect_lists_them(outputs):
    x = outputs["input"]
    target, context = (load_encoder(CKPT, which=w).forward_features(x) for w in UPSTREAM)
    assert not torch.allclose(target, context)
    info = inspect_checkpoint(CKPT)
    assert info["format"] == "tiny_ijepa" and set(info["submodels"]) == set(UPSTREAM)
    assert {"model_args", "optimizer", "iter_num", "config"} <= set(info["other_keys"])


@torch.no_grad()
def test_bias_false_and_compiled_names_read_as_zero_biases(tmp_path, outputs):
    raw = torch.load(CKPT, weights_only=True)
    zeroed = {k: torch.zeros_like(v) if k.endswith(".bias") else v for k, v in raw["model"].items()}
    with_zeros = tmp_path / "zeros.pt"
    save_checkpoint(dict(raw, model=zeroed), with_zeros)
    no_bias = {f"_orig_mod.{k}": v for k, v in raw["model"].items() if not k.endswith(".bias")}
    without = tmp_path / "nobias.pt"  # bias=False, saved from a torch.compile'd model
    save_checkpoint(
        dict(raw, model=no_bias, model_args=dict(raw["model_args"], bias=False)), without
    )
    x = outputs["input"]
    ref = load_encoder(with_zeros).forward_features(x)
    assert torch.equal(load_encoder(without).forward_features(x), ref)


def test_tiny_ijepa_bad_file(tmp_path):
    raw = torch.load(CKPT, weights_only=True)
    args = {k: v for k, v in raw["model_args"].items() if k != "n_head"}
    path = tmp_path / "bad.pt"
    save_checkpoint(dict(raw, model_args=args), path)
    with pytest.raises(CheckpointError, match="model_args.n_head"):
        load_encoder(path)
    args = dict(raw["model_args"], patch_size=2)
    save_checkpoint(dict(raw, model_args=args), path)
    with pytest.raises(CheckpointError, match=r"patchify.proj.weight has shape \(8, 3, 4, 4\)"):
        load_encoder(path)
