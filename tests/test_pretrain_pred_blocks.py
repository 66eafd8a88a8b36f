"""The predictor's block options (``model.pred_block_norm``, ``pred_norm_affine``,
``pred_qk_norm``, ``pred_qkv_bias``, ``pred_proj_bias``, ``pred_mlp_act``).

The featurenorm seed's predictor blocks are its ``src/transformer_blocks.py`` ``TransformerBlock``
(theAdamColton/elucidating-featurenorm-ijepa at commit eb093c217f3b475981c84332245530fd17bc30c3):
``tests/fixtures/featurenorm_pred_blocks/block_qk_*.safetensors`` hold one such block's weights,
inputs and outputs (README there); one toolkit predictor block with those weights gives the same
outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import GELUTanh

from ijepa_toolkit import inspect_checkpoint, load_predictor
from ijepa_toolkit.config import load_config
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.errors import ConfigError
from ijepa_toolkit.formats.featurenorm import rename, under
from ijepa_toolkit.models.norms import DynTanh
from ijepa_toolkit.models.predictor import PredictorArch, predictor_blocks
from ijepa_toolkit.pretrain.model import build_models
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer, check_values

FIXTURES = Path(__file__).parent / "fixtures" / "featurenorm_pred_blocks"
SEED_KEYS = [
    "model.pred_block_norm=dyntanh", "model.pred_qk_norm=layernorm",
    "model.pred_qkv_bias=false", "model.pred_proj_bias=false", "model.pred_mlp_act=gelu_tanh",
    "model.pred_layernorm_eps=1e-5",
]  # fmt: skip


def _tiny(extra: list, tmp_path: Path) -> PretrainConfig:
    return load_config(PretrainConfig, "pretrain/tiny_cpu", [
        f"data.digits_root={tmp_path / 'digits'}", f"logging.folder={tmp_path / 'run'}",
        "logging.tensorboard=false", "logging.rankme_freq=0", "logging.knn_freq=0", *extra,
    ])  # fmt: skip


def _assert_seed_blocks(blocks, head_dim: int) -> None:
    """Each block as ``TransformerBlock`` with norm_mode dyntanh (affine), per-head LayerNorm
    q/k norm (torch's eps 1e-5), ``proj_qkv`` / ``proj_out`` without bias, an MLP with biases
    and tanh GELU."""
    for block in blocks:
        for norm in (block.norm1, block.norm2):
            assert isinstance(norm, DynTanh) and norm.weight is not None
        attn = block.attn
        for qk in (attn.q_norm, attn.k_norm):
            assert isinstance(qk, torch.nn.LayerNorm) and qk.normalized_shape == (head_dim,)
            assert qk.eps == 1e-5
        assert attn.qkv.bias is None and attn.proj.bias is None
        assert block.mlp.fc1.bias is not None and block.mlp.fc2.bias is not None
        assert isinstance(block.mlp.act, GELUTanh)


def test_featnorm_small_predictor_has_the_seed_blocks():
    """featnorm_small.yaml (conf/small.yaml predictor: 6 blocks, 256 wide, head_dim 64)."""
    cfg = load_config(PretrainConfig, "pretrain/featnorm_small", [])
    check_values(cfg)
    with torch.device("meta"):
        predictor = build_models(cfg.model, cfg.data.crop_size)[1]
    _assert_seed_blocks(predictor.predictor_blocks, head_dim=64)
    norm = predictor.predictor_norm  # norm_out_mode: layernorm
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5


@pytest.mark.parametrize("qk", ["layernorm", "dyntanh"])
def test_block_forward_equals_the_seed_block(qk):
    """One predictor block (width 32, 4 heads, LayerNorm eps 1e-5 as torch's default) with the
    seed block's weights computes the seed's ``TransformerBlock.forward`` outputs."""
    saved = load_file(FIXTURES / f"block_qk_{qk}.safetensors")
    arch = PredictorArch(grid=4, embed_dim=32, predictor_embed_dim=32, depth=1, num_heads=4,
                         qkv_bias=False, layernorm_eps=1e-5, block_norm="dyntanh", qk_norm=qk,
                         proj_bias=False, mlp_act="gelu_tanh")  # fmt: skip
    block = predictor_blocks(arch)[0].eval()
    state = under({rename(k): v for k, v in saved.items()}, "block.")  # as formats/featurenorm
    block.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = block(saved["x"])
    assert (out - saved["y"]).abs().max() < 1e-5


def test_defaults_build_the_official_predictor(tmp_path):
    """Spelling the new keys' defaults out builds the same predictor, tensor for tensor under
    one seed: LayerNorm blocks, qkv and proj biases, exact GELU, no q/k norm."""
    over = ["model.pred_block_norm=layernorm", "model.pred_norm_affine=true",
            "model.pred_qk_norm=null", "model.pred_qkv_bias=true", "model.pred_proj_bias=true",
            "model.pred_mlp_act=gelu", "model.pred_layernorm_eps=1e-6"]  # fmt: skip
    built = []
    for extra in ([], over):
        cfg = _tiny(extra, tmp_path)
        torch.manual_seed(0)
        built.append(build_models(cfg.model, cfg.data.crop_size)[1])
    default, spelled = built
    block = default.predictor_blocks[0]
    assert type(block.norm1) is torch.nn.LayerNorm and type(block.mlp.act) is torch.nn.GELU
    assert isinstance(block.attn.q_norm, torch.nn.Identity) and default.predictor_norm.eps == 1e-6
    assert block.attn.qkv.bias is not None and block.attn.proj.bias is not None
    assert list(default.state_dict()) == list(spelled.state_dict())
    for (name, a), (_, b) in zip(default.state_dict().items(), spelled.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_seed_block_run_reloads_the_same_predictor(tmp_path):
    """A saved run with the seed's predictor blocks and its own head count comes back from
    ``load_predictor`` with the same blocks (tanh GELU, LayerNorm eps and heads read from the
    saved config: no tensor shows them) and the same outputs."""
    cfg = _tiny([*SEED_KEYS, "model.pred_num_heads=2"], tmp_path)
    trainer = Pretrainer(cfg, DistInfo(), log=False)
    trainer.save(loss=0.0)
    loaded = load_predictor(str(trainer.ckpt_path))
    ours = trainer.predictor.eval()
    head_dim = cfg.model.pred_emb_dim // 2
    _assert_seed_blocks(loaded.predictor_blocks, head_dim)
    assert loaded.arch == ours.arch
    dim = ours.arch.embed_dim
    x = torch.randn(2, 6, dim)
    ctx, tgt = torch.arange(6).expand(2, -1), torch.arange(6, 10).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ctx, tgt), ours(x, ctx, tgt), rtol=0, atol=1e-6)
    described = inspect_checkpoint(str(trainer.ckpt_path))["submodels"]["predictor"]["arch"]
    assert described["num_heads"] == 2  # ijepa-inspect reads the same heads


@pytest.mark.parametrize(
    "override, key",
    [("model.pred_block_norm=batchnorm", "model.pred_block_norm"),
     ("model.pred_mlp_act=relu", "model.pred_mlp_act"),
     ("model.pred_layernorm_eps=0", "model.pred_layernorm_eps")],
)  # fmt: skip
def test_bad_predictor_block_keys_are_config_errors_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_values(_tiny([override], tmp_path))
