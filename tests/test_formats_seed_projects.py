"""featurenorm and IJEPA-Enhanced checkpoints written by the projects' own savers load as
``VariantViT`` with the seeds' own outputs where expressible, and are refused with exactly the
pieces their encoders need beyond ``VariantViT`` otherwise.

The files under ``tests/fixtures/{featurenorm,ijepa_enhanced}_ckpt/`` were written by
featurenorm's ``Trainer.save_checkpoint`` and ijepa-enhanced's ``io.save``;
``ijepa_enhanced_ckpt/outputs.safetensors`` by theAdamColton/ijepa-enhanced
``ijepa_enhanced/vit.py`` ``ViT.forward`` at commit 03b6a50ff4cde68be66874f7387ff6cdc8615787;
``featurenorm_ckpt/{small,plain}.outputs.safetensors`` by
theAdamColton/elucidating-featurenorm-ijepa ``src/model.py`` ``Encoder.forward`` at commit
eb093c217f3b475981c84332245530fd17bc30c3 (see the READMEs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ijepa_toolkit import CheckpointError, inspect_checkpoint, load_encoder
from ijepa_toolkit.models.vit_variants import VariantViT

FIXTURES = Path(__file__).parent / "fixtures"
QK = "per-head q/k normalisation"
HEAD_DIM = "a head_dim independent of the width"
GELU = "tanh-approximated GELU"
RBN = "RunningBatchNorm output norm"
LS = "LayerScale on the residual branches"
JOINT = "a joint position table"
FN_PIECES = (QK, HEAD_DIM, GELU, RBN)
REGISTERS = "register tokens"


@torch.no_grad()
@pytest.mark.parametrize("name", ["small", "plain"])
@pytest.mark.parametrize("which", ["target_encoder", "encoder"])
def test_featurenorm_checkpoint_loads_with_the_seed_encoder_outputs(name, which):
    """``small.pt`` (conf/small.yaml: DynTanh blocks and non-affine output norm, per-head
    LayerNorm q/k norm, RoPE2D) and ``plain.pt`` (LayerNorm, ``h_emb`` / ``w_emb``): tokens
    equal the seed ``Encoder``'s ``hidden_states`` (with ``norm_out``) and the mean-pooled last
    block (the seed probes' ``lastlayer`` features: without ``norm_out``) its
    ``all_layer_features[-1]``, at the native 8x8 grid and at 4x6."""
    expected = load_file(FIXTURES / f"featurenorm_ckpt/{name}.outputs.safetensors")
    enc = load_encoder(FIXTURES / f"featurenorm_ckpt/{name}.pt", which)
    assert isinstance(enc, VariantViT) and enc.arch.layernorm_eps == 1e-5
    assert enc.pos_kind == {"small": "rope", "plain": "factorized"}[name]
    for grid in ("8x8", "4x6"):
        images = expected[f"images.{grid}"]
        tokens = enc.forward_features(images)
        assert torch.allclose(tokens, expected[f"{which}.{grid}.tokens"], atol=1e-5, rtol=0)
        (last,) = enc.forward_intermediates(
            images, indices=1, intermediates_only=True, output_fmt="NLC"
        )
        pooled = expected[f"{which}.{grid}.pooled_last_block"]
        assert torch.allclose(last.mean(1), pooled, atol=1e-5, rtol=0)


def _registers(model: dict) -> None:
    for prefix in ("encoder.", "ema_encoder."):
        model[prefix + "reg_emb"] = torch.zeros(4, 8)


def _diffmoe(model: dict) -> None:
    for k in [k for k in model if ".mlp.fc" in k]:
        model[k.replace(".mlp.fc", ".mlp.experts_fc")] = model.pop(k)


@pytest.mark.parametrize(
    "edit, piece", [(_registers, REGISTERS), (_diffmoe, "the DiffMoE MLP layout")]
)
def test_featurenorm_layouts_beyond_variant_vit_are_refused_naming_them(tmp_path, edit, piece):
    raw = torch.load(FIXTURES / "featurenorm_ckpt/plain.pt", weights_only=True)
    edit(raw["model"])
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=f"featurenorm.*not expressible.*{piece}"):
        load_encoder(tmp_path / "edited.pt")


@pytest.mark.parametrize(
    "name, found",
    [
        ("featurenorm_ckpt/batchnorm.pt", (HEAD_DIM, RBN)),  # 2 heads x 8, width 8
        ("ijepa_enhanced_ckpt/layerscale.pt", (LS,)),
    ],  # fmt: skip
)
def test_real_checkpoint_refused_with_its_missing_pieces(name, found):
    path = FIXTURES / name
    project = "featurenorm" if name.startswith("featurenorm") else "IJEPA-Enhanced"
    for call in (load_encoder, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=f"{project}.*not expressible") as info:
            call(path)
        message = str(info.value)
        assert message.startswith(str(path))
        listed = {p for p in (*FN_PIECES, LS, JOINT) if p in message}
        assert listed == set(found), message


def test_enhanced_without_compile_pickles_modules_and_is_refused_unread():
    """``torch_compile: false``: ``io.save`` stores the ``nn.Module`` objects; the safe reader
    refuses the file before any format is tried, naming the pickled class."""
    path = FIXTURES / "ijepa_enhanced_ckpt/modules.pt"
    for call in (load_encoder, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=r"pickled Python objects \(ijepa_enhanced\.vit"):
            call(path)


@torch.no_grad()
def test_enhanced_compiled_checkpoint_loads_with_the_enhanced_vit_outputs():
    """``compiled.pt`` (the shape of ``conf/vit-s-patch14.yaml``) -> factorised ``VariantViT``:
    tokens and mean-pooled features equal the Enhanced ``ViT``'s (r = 0) at the native 4x4 grid
    and at 3x2, whose positions are the tables' first rows / columns."""
    expected = load_file(FIXTURES / "ijepa_enhanced_ckpt/outputs.safetensors")
    enc = load_encoder(FIXTURES / "ijepa_enhanced_ckpt/compiled.pt", num_heads=2).eval()
    assert isinstance(enc, VariantViT) and enc.pos_kind == "factorized"
    assert enc.arch.layernorm_eps == 1e-5 and not enc.arch.qkv_bias
    for grid in ("native", "small"):
        images = expected[f"{grid}_images"]
        tokens = enc.forward_features(images)
        assert torch.allclose(tokens, expected[f"{grid}_tokens"], atol=1e-5, rtol=0)
        assert torch.allclose(enc(images), expected[f"{grid}_pooled"], atol=1e-5, rtol=0)
    student = load_encoder(FIXTURES / "ijepa_enhanced_ckpt/compiled.pt", "encoder", num_heads=2)
    assert torch.equal(student.pos_embed_row, enc.pos_embed_row)  # teacher = copy of student


def _joint(sd: dict) -> None:
    sd["position_embed.embed"] = torch.cat([sd.pop("position_embed.h_embed")] * 4)
    del sd["position_embed.w_embed"]


def _tall(sd: dict) -> None:
    sd["position_embed.h_embed"] = torch.cat([sd["position_embed.h_embed"]] * 2)


@pytest.mark.parametrize(
    "edit, piece",
    [(_joint, "joint position table"), (_tall, r"non-square position tables \(.* 8 rows")],
)
def test_enhanced_tables_beyond_variant_vit_are_refused_naming_them(tmp_path, edit, piece):
    raw = torch.load(FIXTURES / "ijepa_enhanced_ckpt/compiled.pt", weights_only=True)
    for name in ("teacher", "student"):
        edit(raw[name])
    path = tmp_path / "edited.pt"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=f"IJEPA-Enhanced.*not expressible.*{piece}"):
        load_encoder(path)


def test_a_tanh_gelu_encoder_is_not_exported_where_the_activation_would_be_lost(tmp_path):
    """No tensor records featurenorm's tanh GELU: an export would reload with timm's exact GELU."""
    from ijepa_toolkit.errors import CheckpointError
    from ijepa_toolkit.export import export_encoder

    with pytest.raises(CheckpointError, match="gelu_tanh, which an export cannot record"):
        export_encoder(FIXTURES / "featurenorm_ckpt/small.pt", tmp_path / "enc.safetensors")
    assert not (tmp_path / "enc.safetensors").exists()
