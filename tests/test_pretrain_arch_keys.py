"""The pretraining config reaches the encoder's attention / MLP options (``model.qk_norm``,
``model.qkv_bias``, ``model.mlp_act``) and AdamW's betas (``optimization.betas``).

The pretraining encoder is checked against featurenorm's own encoder:
``tests/fixtures/featurenorm_ckpt/small.pt`` (+ ``small.outputs.safetensors``) were written by
theAdamColton/elucidating-featurenorm-ijepa ``src/trainer.py`` ``Trainer.save_checkpoint`` /
``src/model.py`` ``Encoder.forward`` at commit eb093c217f3b475981c84332245530fd17bc30c3 (blocks
of ``src/transformer_blocks.py``: ``proj_qkv`` / ``proj_out`` without bias, per-head LayerNorm
q/k norm, ``nn.GELU(approximate="tanh")``; AdamW betas (0.9, 0.95) in ``main.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import GELUTanh

from ijepa_toolkit import load_encoder
from ijepa_toolkit.config import load_config
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.errors import ConfigError
from ijepa_toolkit.formats.featurenorm import rename, under
from ijepa_toolkit.pretrain.model import build_encoder, build_models
from ijepa_toolkit.pretrain.sections import ModelSection
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer, check_values

FIXTURES = Path(__file__).parent / "fixtures" / "featurenorm_ckpt"
# small.pt's encoder (README there): width 8, 1 block, 1 head, patch 4, 8 x 8 grid, DynTanh
# blocks, DynTanh output norm, RoPE2D, per-head LayerNorm q/k norm; torch LayerNorm eps 1e-5
SEED_SMALL = dict(
    model_name="vit_tiny", patch_size=4, pos_embed="rope", block_norm="dyntanh",
    output_norm="dyntanh", norm_affine=True, qk_norm="layernorm", qkv_bias=False,
    mlp_act="gelu_tanh", arch={"embed_dim": 8, "depth": 1, "num_heads": 1, "layernorm_eps": 1e-5},
)  # fmt: skip


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@torch.no_grad()
def test_pretraining_encoder_is_the_seed_encoder():
    """With small.pt's settings the pretraining code builds the encoder the featurenorm importer
    builds from the file (same tensor names and shapes), and with the file's weights it computes
    the seed ``Encoder``'s tokens at the 8x8 and the 4x6 grid."""
    torch.manual_seed(0)
    encoder = build_encoder(ModelSection(**SEED_SMALL), img_size=32)
    imported = load_encoder(FIXTURES / "small.pt", "encoder")
    assert _shapes(encoder) == _shapes(imported)
    block = encoder.blocks[0]
    assert block.attn.qkv.bias is None and isinstance(block.mlp.act, GELUTanh)
    assert isinstance(block.attn.q_norm, torch.nn.LayerNorm) and block.attn.q_norm.eps == 1e-5
    encoder.load_state_dict(imported.state_dict())
    expected = load_file(FIXTURES / "small.outputs.safetensors")
    for grid in ("8x8", "4x6"):
        tokens = encoder.forward_features(expected[f"images.{grid}"])
        assert torch.allclose(tokens, expected[f"encoder.{grid}.tokens"], atol=1e-5, rtol=0)


def test_only_the_attention_output_bias_is_beyond_the_seed():
    """The trained tensors of the pretraining encoder with the seed's non-affine output norm
    are the seed encoder's (renamed as the importer does) plus ``attn.proj.bias``: featurenorm's
    ``proj_out`` has none, timm's ``Attention`` always has one (what the recipe cannot say)."""
    section = ModelSection(**{**SEED_SMALL, "norm_out_affine": False})
    with torch.device("meta"):
        encoder = build_encoder(section, img_size=32)
    ours = {k for k, _ in encoder.named_parameters()}
    model = torch.load(FIXTURES / "small.pt", weights_only=True)["model"]
    seed = {rename(k.replace("norm_out.", "norm.", 1)) for k in under(model, "encoder.")}
    seed = {k.replace("proj_in.", "patch_embed.proj.") for k in seed}
    assert ours - seed == {"blocks.0.attn.proj.bias"} and seed - ours == set()


def test_defaults_build_the_official_encoder():
    """Without the new keys the encoder is the official one (qkv bias, exact GELU, no q/k norm)
    and the tiny recipe's first weights are unchanged by spelling the defaults out."""
    over = ["model.qk_norm=null", "model.qkv_bias=true", "model.mlp_act=gelu"]
    built = []
    for extra in ([], over):
        cfg = load_config(PretrainConfig, "pretrain/tiny_cpu", extra)
        torch.manual_seed(0)
        built.append(build_models(cfg.model, cfg.data.crop_size)[0])
    default, spelled = built
    assert type(default).__name__ == "IJEPAVisionTransformer"
    attn = default.blocks[0].attn
    assert attn.qkv.bias is not None and isinstance(attn.q_norm, torch.nn.Identity)
    assert isinstance(default.blocks[0].mlp.act, torch.nn.GELU)
    for (name, a), (_, b) in zip(default.state_dict().items(), spelled.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("betas", [None, (0.9, 0.95)])
def test_betas_reach_the_optimizer(tmp_path, betas):
    """``optimization.betas`` are every AdamW param group's betas; the default is torch's."""
    extra = [] if betas is None else [f"optimization.betas=[{betas[0]}, {betas[1]}]"]
    cfg = load_config(PretrainConfig, "pretrain/tiny_cpu", [
        f"data.digits_root={tmp_path / 'digits'}", f"logging.folder={tmp_path / 'run'}",
        "logging.tensorboard=false", "logging.rankme_freq=0", "logging.knn_freq=0", *extra,
    ])  # fmt: skip
    trainer = Pretrainer(cfg, DistInfo(), log=False)
    torch_default = torch.optim.AdamW([torch.zeros(1)]).defaults["betas"]
    want = torch_default if betas is None else betas
    assert [g["betas"] for g in trainer.optimizer.param_groups] == [want] * len(
        trainer.optimizer.param_groups
    )


def test_bad_betas_and_choices_are_config_errors_naming_the_key():
    for key, value in (("optimization.betas", "[0.9, 1.0]"), ("model.mlp_act", "relu"),
                       ("model.qk_norm", "rmsnorm")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^{key}"):
            load_config(PretrainConfig, "pretrain/tiny_cpu", [f"{key}={value}"])


def test_featnorm_small_sets_the_seed_blocks_and_betas():
    """featnorm_small.yaml: q/k LayerNorm, qkv without bias, tanh GELU, betas (0.9, 0.95)."""
    cfg = load_config(PretrainConfig, "pretrain/featnorm_small", [])
    check_values(cfg)
    assert cfg.optimization.betas == (0.9, 0.95)
    with torch.device("meta"):
        encoder = build_encoder(cfg.model, cfg.data.crop_size)
    for block in encoder.blocks:
        assert block.attn.qkv.bias is None and isinstance(block.mlp.act, GELUTanh)
        assert isinstance(block.attn.q_norm, torch.nn.LayerNorm)
        assert block.attn.q_norm.normalized_shape == (64,)  # head_dim 64


def test_a_tanh_gelu_run_loads_back_with_tanh_gelu(tmp_path):
    """No tensor records the MLP activation: the loader reads ``model.mlp_act`` from the run's
    saved config, so a ``gelu_tanh`` encoder comes back as one, with the same outputs."""
    cfg = load_config(PretrainConfig, "pretrain/tiny_cpu", [
        f"data.digits_root={tmp_path / 'digits'}", f"logging.folder={tmp_path / 'run'}",
        "logging.tensorboard=false", "logging.rankme_freq=0", "logging.knn_freq=0",
        "model.mlp_act=gelu_tanh", "model.qk_norm=layernorm",
    ])  # fmt: skip
    trainer = Pretrainer(cfg, DistInfo(), log=False)
    trainer.save(loss=0.0)
    encoder = load_encoder(str(trainer.ckpt_path), which="target_encoder").eval()
    assert isinstance(encoder.blocks[0].mlp.act, GELUTanh)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = trainer.target_encoder.eval().forward_features(x)
        torch.testing.assert_close(encoder.forward_features(x), want, rtol=0, atol=1e-6)
