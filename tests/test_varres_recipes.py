"""The seed recipes' shipped configs: the full-size ones validate and build (on the meta
device), the tiny CPU variants pretrain in-process (configs/pretrain/featnorm_*.yaml,
enhanced_*.yaml; docs/packing.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ijepa_toolkit.config import load_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.models.diffmoe import DiffMoEMlp
from ijepa_toolkit.models.norms import DynTanh
from ijepa_toolkit.pretrain.model import build_models
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer, check_values


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=8)


def test_featnorm_small_builds_the_seed_shapes():
    """conf/small.yaml: 12 x 384 encoder, 6 heads; DynTanh blocks with affine, the output
    DynTanh without (norm_elementwise_affine: false); a 6-block predictor 256 wide, 4 heads."""
    cfg = load_config(PretrainConfig, "pretrain/featnorm_small", [])
    check_values(cfg)
    with torch.device("meta"):
        encoder, predictor, _ = build_models(cfg.model, cfg.data.crop_size)
    heads = encoder.blocks[0].attn.num_heads
    assert (len(encoder.blocks), encoder.embed_dim, heads) == (12, 384, 6)
    norm1, out = encoder.blocks[0].norm1, encoder.norm
    assert isinstance(norm1, DynTanh) and norm1.weight is not None
    assert isinstance(out, DynTanh) and out.weight is None and out.bias is None
    assert len(predictor.predictor_blocks) == 6
    assert predictor.predictor_blocks[0].attn.num_heads == 4
    assert predictor.predictor_embed.out_features == 256


def test_enhanced_vits_builds_the_seed_shapes():
    """conf/vit-s-patch14.yaml: ViT-S/14 with factorised 32 x 32 tables, a 4-block predictor
    256 wide with 4 heads, ToMe 4 / 16 tokens a block."""
    cfg = load_config(PretrainConfig, "pretrain/enhanced_vits", [])
    check_values(cfg)
    with torch.device("meta"):
        encoder, predictor, _ = build_models(cfg.model, cfg.data.crop_size)
    assert encoder.pos_kind == "factorized" and encoder.pos_embed_row.shape[1] == 18
    assert (len(encoder.blocks), encoder.embed_dim) == (12, 384)
    assert len(predictor.predictor_blocks) == 4
    assert predictor.predictor_blocks[0].attn.num_heads == 4
    assert cfg.model.target_rates() == [16] * 12 and cfg.model.tome_rates == [4] * 12


@pytest.mark.parametrize(
    "name, epochs, extra",
    [("featnorm_tiny", 2, []), ("enhanced_tiny", 2, []),
     ("featnorm_tiny", 1, ["model.target_norm=batchnorm"]),
     ("featnorm_tiny", 1, ["model.moe_experts=2"])],
)  # fmt: skip
def test_tiny_recipe_trains(digits, tmp_path, name, epochs, extra):
    """The tiny recipes on 80 digits (also with batch-norm targets over the packed target
    tokens, and with DiffMoE MLPs told the padding): finite losses, the kNN probe at init and at
    the end."""
    train, val = digits
    over = [f"data.train_folder={train}", "data.digits_root=null", f"data.knn_train_folder={train}",
            f"data.knn_val_folder={val}", f"optimization.epochs={epochs}",
            f"logging.folder={tmp_path}", f"logging.knn_freq={epochs}", "logging.rankme_freq=0",
            "logging.tensorboard=false", "data.batch_size=32", *extra]  # fmt: skip
    cfg = load_config(PretrainConfig, f"pretrain/{name}", over)
    trainer = Pretrainer(cfg, DistInfo())
    metrics = trainer.run()
    trainer.log.close()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["loss"] > 0
    assert 0 <= metrics["knn_top1"] <= 100 and "knn_top1_init" in metrics
    assert trainer.step == epochs * len(trainer.sampler) >= epochs
    moes = [m for m in trainer.encoder.modules() if isinstance(m, DiffMoEMlp)]
    assert all(m.padding is None for m in moes)  # set for one forward only
    if "model.moe_experts=2" in extra:
        assert moes and float(trainer.moe_loss().detach()) > 0


@pytest.mark.parametrize("blocks, out", [(True, False), (False, True), (True, None)])
def test_output_dyntanh_affine_is_its_own_switch(blocks, out):
    """``model.norm_out_affine`` sets the output DynTanh's weight/bias apart from the blocks'
    (``model.norm_affine``; null: the same), and a saved state dict reads back the same."""
    from ijepa_toolkit.models.vit import infer_encoder_arch
    from ijepa_toolkit.pretrain.model import ModelSection

    section = ModelSection(model_name="vit_tiny", patch_size=4, pred_depth=1, pred_emb_dim=16,
                           arch={"embed_dim": 32, "depth": 1, "num_heads": 2},
                           block_norm="dyntanh", output_norm="dyntanh", norm_affine=blocks,
                           norm_out_affine=out)  # fmt: skip
    encoder = build_models(section, 16)[0]
    expect_out = blocks if out is None else out
    assert (encoder.blocks[0].norm1.weight is not None) == blocks
    assert (encoder.norm.weight is not None) == expect_out
    arch = infer_encoder_arch(encoder.state_dict(), num_heads=2)
    assert (arch.norm_affine, arch.output_affine()) == (blocks, expect_out)
