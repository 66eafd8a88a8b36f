"""Predictor register tokens (``model.pred_num_registers``): excluded from the predictions,
trained, saved and reloaded by ``load_predictor``; 0 registers is the official predictor."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from _featurenorm import sub_state
from _tiny_pretrain import CONFIG, tiny_overrides
from safetensors.torch import load_file
from timm.models.vision_transformer import Block
from torch import nn

from ijepa_toolkit import load_predictor
from ijepa_toolkit.config import ConfigError, load_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer

FIXTURES = Path(__file__).parent / "fixtures" / "ijepa_enhanced_predictor"
ARCH = dict(grid=4, embed_dim=32, predictor_embed_dim=16, num_heads=2)


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ctx_ids = torch.stack([torch.randperm(16, generator=gen)[:6] for _ in range(batch)])
    tgt_ids = torch.stack([torch.randperm(16, generator=gen)[:5] for _ in range(batch)])
    return torch.randn(batch, 6, 32, generator=gen), ctx_ids, tgt_ids


def test_zero_registers_is_the_official_parameter_set():
    official = IJEPAPredictor(PredictorArch(depth=1, **ARCH)).state_dict()
    with_regs = IJEPAPredictor(PredictorArch(depth=1, num_registers=3, **ARCH)).state_dict()
    assert "predictor_registers" not in official
    assert set(with_regs) - set(official) == {"predictor_registers"}
    assert with_regs["predictor_registers"].shape == (1, 3, 16)


def test_registers_are_dropped_from_the_predictions():
    torch.manual_seed(0)
    x, ctx_ids, tgt_ids = _inputs()
    # depth 0: each prediction is proj(norm(its own input token)), so any slicing error shows
    plain = IJEPAPredictor(PredictorArch(depth=0, **ARCH)).eval()
    regs = IJEPAPredictor(PredictorArch(depth=0, num_registers=2, **ARCH)).eval()
    regs.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(regs(x, ctx_ids, tgt_ids), plain(x, ctx_ids, tgt_ids))
    # with blocks: exactly one prediction per target token, in target order
    model = IJEPAPredictor(PredictorArch(depth=1, num_registers=2, **ARCH)).eval()
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        out = model(x, ctx_ids, tgt_ids)
        permuted = model(x, ctx_ids, tgt_ids[:, perm])
        assert out.shape == (3, 5, 32)
        torch.testing.assert_close(permuted, out[:, perm])
        # (a per-channel change: a constant shift would vanish in the blocks' LayerNorm)
        g = torch.Generator().manual_seed(0)
        model.predictor_registers.add_(torch.randn(model.predictor_registers.shape, generator=g))
        assert not torch.allclose(model(x, ctx_ids, tgt_ids), out)  # registers are attended to


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=8)


def _trainer(digits, folder, **extra) -> Pretrainer:
    opts = {"model.arch": "{embed_dim: 32, depth: 2, num_heads: 2}", "optimization.epochs": 1,
            "logging.rankme_freq": 0, **extra}  # fmt: skip
    cfg = load_config(PretrainConfig, CONFIG, tiny_overrides(digits, folder, **opts))
    return Pretrainer(cfg, DistInfo())


def test_predictor_registers_train_and_round_trip(digits, tmp_path):
    trainer = _trainer(digits, tmp_path, **{"model.pred_num_registers": 2})
    registers = trainer.predictor.predictor_registers
    grads = []
    registers.register_hook(lambda g: grads.append(g.detach().clone()))
    before = registers.detach().clone()
    row = trainer.train_step(next(iter(trainer.loader))[0])
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert len(grads) == 1 and grads[0].abs().sum() > 0
    assert not torch.equal(registers.detach(), before)
    trainer.save(row["loss"])
    trainer.log.close()

    loaded = load_predictor(trainer.ckpt_path, num_heads=2)
    assert loaded.arch.num_registers == 2
    live = trainer.predictor.eval()
    x, ctx_ids, tgt_ids = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, ctx_ids, tgt_ids), live(x, ctx_ids, tgt_ids))
    with pytest.raises(ConfigError, match="pred_num_registers"):
        _trainer(
            digits, tmp_path / "bad", **{"packing.enabled": True, "model.pred_num_registers": 1}
        )
    with pytest.raises(ConfigError, match="pred_num_registers"):
        _trainer(digits, tmp_path / "neg", **{"model.pred_num_registers": -1})


@pytest.mark.parametrize("kind", ["pass", "zero", "add"])
def test_encoder_registers_enter_the_predictor_as_featurenorm(kind):
    """``model.pred_encoder_registers``: the context encoder's register outputs are predictor
    context tokens at patch (0, 0)'s position; with predictor registers they are replaced
    (``zero``, featurenorm's default ``should_zero_ctx_register_tokens``) or added to
    (``add``); with none they pass through (``pass``). Predictions equal featurenorm's
    ``Predictor.forward`` (src/model.py, theAdamColton/elucidating-featurenorm-ijepa@
    eb093c217f3b475981c84332245530fd17bc30c3) on the same tensors, its learned (row, col)
    tables set to this predictor's additive sin-cos table, its blocks in timm blocks."""
    f = load_file(FIXTURES / f"featurenorm_pred_registers_{kind}.safetensors")
    regs = 0 if kind == "pass" else 3
    arch = PredictorArch(grid=4, embed_dim=12, predictor_embed_dim=16, depth=2, num_heads=2,
                         layernorm_eps=1e-5, num_registers=regs)  # fmt: skip
    pred = IJEPAPredictor(arch, zero_encoder_registers=kind == "zero").eval()
    pred.predictor_blocks = nn.ModuleList(
        Block(16, 2, qkv_bias=False, norm_layer=nn.LayerNorm,
              act_layer=partial(nn.GELU, approximate="tanh"))
        for _ in range(2)
    )  # fmt: skip
    table = (f["pred.h_emb"][:, None] + f["pred.w_emb"][None]).reshape(1, 16, 16)
    torch.testing.assert_close(pred.predictor_pos_embed, table, atol=1e-6, rtol=0)
    rename = (("attention.proj_qkv", "attn.qkv"), ("attention.proj_out", "attn.proj"),
              ("proj_in.", "predictor_embed."), ("norm_out.", "predictor_norm."),
              ("proj_out.", "predictor_proj."), ("blocks.", "predictor_blocks."))  # fmt: skip
    state = sub_state(f, "pred.", rename)
    state["mask_token"] = state.pop("pred_emb").view(1, 1, 16)
    if regs:
        state["predictor_registers"] = state.pop("reg_emb")[None]
    for i in range(2):
        state[f"predictor_blocks.{i}.attn.proj.bias"] = torch.zeros(16)
    missing = pred.load_state_dict(state, strict=False)
    assert set(missing.missing_keys) == {"predictor_pos_embed"}
    assert set(missing.unexpected_keys) == {"h_emb", "w_emb"}
    with torch.no_grad():
        out = pred(f["context"], f["ctx_idx"], f["tgt_idx"], registers=f["registers"])
        without = pred(f["context"], f["ctx_idx"], f["tgt_idx"])
    torch.testing.assert_close(out, f["out"], atol=1e-5, rtol=0)
    assert (out - without).abs().max() > 1e-3  # the registers matter


def test_encoder_registers_to_predictor_train_with_token_drop(digits, tmp_path):
    opts = {"model.num_registers": 2, "model.pred_encoder_registers": True,
            "model.pred_capacity": 0.5, "model.pred_repeats": 2}  # fmt: skip
    trainer = _trainer(digits, tmp_path, **opts)
    assert trainer.context.encoder_registers
    row = trainer.train_step(next(iter(trainer.loader))[0])
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    with pytest.raises(ConfigError, match="pred_encoder_registers"):
        _trainer(digits, tmp_path / "none", **{"model.pred_encoder_registers": True})
    with pytest.raises(ConfigError, match="pred_encoder_registers"):
        _trainer(digits, tmp_path / "mismatch", **{**opts, "model.pred_num_registers": 3})
