"""Pretraining with the variable-resolution encoder options: trains, checkpoints, loads, probes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _tiny_pretrain import CONFIG, tiny_overrides

from ijepa_toolkit import load_encoder
from ijepa_toolkit.config import ConfigError, load_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.engine.logger import read_jsonl
from ijepa_toolkit.models.heads import pooled_features
from ijepa_toolkit.models.vit_variants import VariantViT
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=8)


def _trainer(digits, folder, **extra) -> Pretrainer:
    opts = {"model.arch": "{embed_dim: 32, depth: 2, num_heads: 2}", "optimization.epochs": 1,
            "logging.rankme_freq": 0, "logging.knn_freq": 1, **extra}  # fmt: skip
    cfg = load_config(PretrainConfig, CONFIG, tiny_overrides(digits, folder, **opts))
    return Pretrainer(cfg, DistInfo())


@pytest.mark.parametrize(
    "options",
    [{"model.pos_embed": "rope", "model.num_registers": 2}, {"model.pos_embed": "factorized"}],
)
def test_pretrain_with_options_trains_and_loads(digits, tmp_path, options):
    trainer = _trainer(digits, tmp_path, **options)
    assert isinstance(trainer.encoder, VariantViT)
    metrics = trainer.run()
    trainer.log.close()
    assert 0 <= metrics["knn_top1"] <= 100
    loaded = load_encoder(trainer.ckpt_path, num_heads=2)
    assert isinstance(loaded, VariantViT) and loaded.pos_kind == options["model.pos_embed"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        live = trainer.target_encoder.eval()
        assert torch.equal(loaded.forward_features(images), live.forward_features(images))
        assert pooled_features(loaded, images, "avg").shape == (2, 32)


def test_default_model_section_builds_the_plain_encoder(digits, tmp_path):
    trainer = _trainer(digits, tmp_path)
    assert not isinstance(trainer.encoder, VariantViT)
    assert not trainer.encoder.pos_embed.requires_grad


def test_pretrain_with_token_drop_repeats_the_predictor_batch(digits, tmp_path):
    extra = {"model.pred_capacity": 0.25, "model.pred_repeats": 4, "logging.knn_freq": 0}
    trainer = _trainer(digits, tmp_path, **extra)
    ((_, masks_enc, masks_pred),) = trainer.sample_masks(16)
    drop = trainer.sample_token_drop(masks_enc, masks_pred)
    assert drop.masks_pred[0].shape[0] == 4 * 16
    row = trainer.train_step(next(iter(trainer.loader))[0])
    assert row["loss"] > 0 and row["grad_norm"] > 0
    with pytest.raises(ConfigError, match="pred_replacement"):
        _trainer(digits, tmp_path / "bad", **{"model.pred_capacity": 0.5, "model.pred_repeats": 4,
                                              "model.pred_replacement": False})  # fmt: skip


def test_packed_variable_resolution_pretraining_lowers_the_loss(digits, tmp_path):
    extra = {"packing.enabled": True, "packing.min_side": 16, "packing.max_side": 32,
             "packing.ctx_budget": 128, "packing.tgt_budget": 32, "optimization.epochs": 4,
             "logging.knn_freq": 0}  # fmt: skip
    trainer = _trainer(digits, tmp_path, **extra)
    metrics = trainer.run()
    trainer.log.close()
    rows = [r for r in read_jsonl(tmp_path / "log.jsonl") if "padding" in r]
    losses = [r["loss"] for r in rows]
    assert len(rows) == trainer.step >= 8 and all(0 <= r["padding"] < 0.5 for r in rows)
    assert sum(losses[-3:]) < sum(losses[:3])
    loaded = load_encoder(trainer.ckpt_path, num_heads=2)
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 24, 16)).shape == (2, 32)  # any patch-multiple size
    assert metrics["loss"] > 0
    with pytest.raises(ConfigError, match="packing"):
        _trainer(digits, tmp_path / "bad", **{"packing.enabled": True, "model.num_registers": 1})


def test_packed_pretraining_with_tome_steps(digits, tmp_path):
    extra = {"packing.enabled": True, "packing.ctx_budget": 128, "packing.tgt_budget": 32,
             "model.tome_rates": "[8, 4]", "logging.knn_freq": 0}  # fmt: skip
    trainer = _trainer(digits, tmp_path, **extra)
    row = trainer.train_step(next(iter(trainer.loader))[0])
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    with pytest.raises(ConfigError, match="tome_rates"):
        _trainer(digits, tmp_path / "bad", **{"model.tome_rates": "[1, 1]"})


def test_pretraining_with_diffmoe_adds_the_capacity_loss(digits, tmp_path):
    extra = {"model.moe_experts": 2, "logging.knn_freq": 0}
    trainer = _trainer(digits, tmp_path, **extra)
    predictor = trainer.encoder.blocks[0].mlp.capacity_predictor[2].weight
    before = predictor.detach().clone()
    row = trainer.train_step(next(iter(trainer.loader))[0])
    assert math.isfinite(row["loss"])
    assert float(trainer.moe_loss().detach()) > 0
    assert not torch.equal(predictor.detach(), before)  # trained by the BCE term
    trainer.save(row["loss"])
    loaded = load_encoder(trainer.ckpt_path, which="encoder", num_heads=2)
    assert loaded.blocks[0].mlp.num_experts == 2 and not loaded.training
