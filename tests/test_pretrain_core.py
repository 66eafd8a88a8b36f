"""Pretraining pieces against direct computations: schedules, EMA, loss, target norms, StoP,
DynTanh encoders (and their checkpoints), optimizer groups."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ijepa_toolkit import load_encoder, save_checkpoint
from ijepa_toolkit.config import ConfigError, load_config
from ijepa_toolkit.configs import CONFIG_DIR
from ijepa_toolkit.export import timm_spec
from ijepa_toolkit.masks.multiblock import MultiBlockMaskSampler
from ijepa_toolkit.models.norms import DynTanh
from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch
from ijepa_toolkit.models.vit import EncoderArch, create_encoder
from ijepa_toolkit.pretrain.model import ema_update_, encoder_arch, prediction_loss, targets_at
from ijepa_toolkit.pretrain.schedules import (
    Schedules,
    cosine_wd,
    ema_momentum,
    three_phase_ema,
    warmup_cosine_lr,
    warmup_steady_cooldown_lr,
)
from ijepa_toolkit.pretrain.targets import TargetNorm
from ijepa_toolkit.pretrain.train import (
    PretrainConfig,
    check_folders,
    check_values,
    param_groups,
)


def test_lr_schedule_start_warmup_end_and_middle_of_cosine():
    kw = dict(warmup_steps=10, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, total_steps=110)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(2e-4)
    assert warmup_cosine_lr(5, **kw) == pytest.approx(2e-4 + 0.5 * (1e-3 - 2e-4))
    assert warmup_cosine_lr(10, **kw) == pytest.approx(1e-3)
    assert warmup_cosine_lr(60, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert warmup_cosine_lr(110, **kw) == pytest.approx(1e-6)


def test_wd_and_momentum_schedules():
    assert cosine_wd(0, 0.04, 0.4, 100) == pytest.approx(0.04)
    assert cosine_wd(50, 0.04, 0.4, 100) == pytest.approx(0.22)
    assert cosine_wd(100, 0.04, 0.4, 100) == pytest.approx(0.4)
    assert ema_momentum(0, 0.996, 1.0, 200) == pytest.approx(0.996)
    assert ema_momentum(100, 0.996, 1.0, 200) == pytest.approx(0.998)
    assert ema_momentum(200, 0.996, 1.0, 200) == pytest.approx(1.0)


def test_schedules_follow_the_official_iteration_convention():
    s = Schedules(
        iterations_per_epoch=10, epochs=4, warmup_epochs=1, start_lr=0.0, lr=1.0, final_lr=0.0,
        weight_decay=0.1, final_weight_decay=0.3, ipe_scale=1.25,
    )  # fmt: skip
    assert (s.total_steps, s.warmup_steps) == (50, 10)
    lr, wd, m = s.at(0)  # the official scheduler.step() runs before iteration 0: step 1
    assert lr == pytest.approx(0.1)
    assert wd == pytest.approx(0.3 + (0.1 - 0.3) * 0.5 * (1 + math.cos(math.pi / 50)))
    assert m == pytest.approx(0.996)
    assert s.at(9)[0] == pytest.approx(1.0)
    assert s.at(39)[2] == pytest.approx(0.996 + 39 * 0.004 / 50)


def test_ema_update_against_direct_computation():
    torch.manual_seed(0)
    src, tgt = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    before = [p.clone() for p in tgt.parameters()]
    ema_update_(tgt, src, 0.9)
    for b, s, t in zip(before, src.parameters(), tgt.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-7)
    assert not any(p.grad is not None for p in tgt.parameters())


def test_loss_and_targets_against_direct_computation():
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 8)
    masks = [torch.tensor([[0, 3, 5], [1, 2, 15]]), torch.tensor([[4, 6, 7], [8, 9, 10]])]
    h = targets_at(tokens, masks, num_enc_masks=2)
    assert h.shape == (8, 3, 8)
    order = [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1), (1, 0), (1, 1)]  # mask, image
    for row, (m, b) in enumerate(order):
        assert torch.equal(h[row], tokens[b, masks[m][b]])
    z = torch.randn_like(h) * 2
    d = (z - h).abs()
    smooth = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    assert prediction_loss(z, h) == pytest.approx(float(smooth), rel=1e-6)
    assert prediction_loss(z, h, "l2") == pytest.approx(float(((z - h) ** 2).mean()), rel=1e-6)


def test_target_norms_against_direct_computation():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 4) * 3 + 1
    ln = TargetNorm("layernorm", 4)(h)
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(ln, (h - mu) / (var + 1e-5).sqrt(), atol=1e-5)
    flat = h.reshape(-1, 4)
    bn = TargetNorm("batchnorm", 4)(h)
    std = flat.std(0)  # unbiased, over every token (no mask given), clamped at 1e-7
    assert torch.allclose(bn, (h - flat.mean(0)) / std, atol=1e-5)
    assert torch.equal(TargetNorm("none", 4)(h), h)
    run = TargetNorm("running_batchnorm", 4, momentum=0.99)
    h2 = torch.randn(3, 5, 4)
    run(h)
    out = run(h2)
    f2 = h2.reshape(-1, 4)
    mean = 0.99 * flat.mean(0) + 0.01 * f2.mean(0)
    sd = 0.99 * std + 0.01 * f2.std(0)
    assert torch.allclose(out, (h2 - mean) / sd, atol=1e-5)
    assert set(run.state_dict()) == {"running_mean", "running_std", "initialized"}


def _predictor(stop_sigma=0.0):
    torch.manual_seed(0)
    arch = PredictorArch(grid=4, embed_dim=16, predictor_embed_dim=8, depth=1, num_heads=2)
    return IJEPAPredictor(arch, stop_sigma=stop_sigma).eval()


def test_stop_replaces_mask_token_by_embedded_noise_and_keeps_key_names():
    official, stop = _predictor(), _predictor(stop_sigma=0.25)
    assert set(official.state_dict()) == set(stop.state_dict())
    assert not stop.mask_token.requires_grad
    x = torch.randn(2, 5, 16)
    mx, m = torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (2, 3))
    # with (almost) no noise, StoP's target input is pos + predictor_embed(0) = pos + bias:
    # the official forward with the mask token set to that bias
    stop.stop_sigma = 1e-12
    with torch.no_grad():
        official.mask_token.copy_(stop.predictor_embed.bias.view(1, 1, -1))
        assert torch.allclose(stop(x, mx, m), official(x, mx, m), atol=1e-6)
    stop.stop_sigma = 0.25
    with torch.no_grad():
        stop.mask_token.fill_(100.0)  # unused under StoP
        torch.manual_seed(1)
        a = stop(x, mx, m)
        torch.manual_seed(1)
        b = stop(x, mx, m)
        c = stop(x, mx, m)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the noise goes through predictor_embed: its weight gets gradient from the target tokens
    stop.train()
    stop.zero_grad()
    stop(torch.zeros(2, 5, 16), mx, m).sum().backward()
    assert stop.predictor_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm,block_norm,affine", [("dyntanh", "layernorm", True),
                                                    ("dyntanh", "dyntanh", False)])  # fmt: skip
def test_dyntanh_encoder_is_timm_vit_and_round_trips(tmp_path, norm, block_norm, affine):
    arch = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, norm=norm,
                       block_norm=block_norm, norm_affine=affine)  # fmt: skip
    torch.manual_seed(0)
    enc = create_encoder(arch).eval()
    assert isinstance(enc, VisionTransformer) and isinstance(enc.norm, DynTanh)
    assert isinstance(enc.blocks[0].norm1, DynTanh) == (block_norm == "dyntanh")
    assert float(enc.norm.alpha.detach()[0]) == 0.5 and (enc.norm.weight is not None) == affine
    with torch.no_grad():
        enc.norm.alpha.uniform_(0.2, 0.9)
        x = torch.randn(40, 32)
        manual = torch.tanh(enc.norm.alpha * x)
        if affine:
            enc.norm.weight.normal_()
            manual = manual * enc.norm.weight + enc.norm.bias
        assert torch.allclose(enc.norm(x), manual)
    sd = {f"module.{k}": v for k, v in enc.state_dict().items()}
    save_checkpoint({"encoder": sd, "target_encoder": sd, "epoch": 1}, tmp_path / "c.pth")
    loaded = load_encoder(tmp_path / "c.pth", num_heads=4)
    assert loaded.arch.norm == norm and loaded.arch.block_norm == block_norm
    assert loaded.arch.norm_affine == affine
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), enc.forward_features(images))
    with pytest.raises(ValueError, match="DynTanh"):
        timm_spec(loaded.arch)  # export to plain timm would silently need LayerNorm


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    enc = create_encoder(EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=1,
                                     num_heads=4, norm="dyntanh"))  # fmt: skip
    enc.pos_embed.requires_grad_(False)
    pred = _predictor(stop_sigma=0.25)
    groups = param_groups(enc, pred)
    decayed = {id(p) for g in groups if not g.get("WD_exclude") for p in g["params"]}
    excluded = {id(p) for g in groups if g.get("WD_exclude") for p in g["params"]}
    assert id(enc.norm.alpha) in excluded and id(enc.blocks[0].attn.qkv.bias) in excluded
    assert (
        id(enc.blocks[0].attn.qkv.weight) in decayed and id(enc.patch_embed.proj.weight) in decayed
    )
    assert (
        id(enc.pos_embed) not in decayed | excluded
        and id(pred.mask_token) not in decayed | excluded
    )
    trainable = [p for m in (enc, pred) for p in m.parameters() if p.requires_grad]
    assert len(decayed) + len(excluded) == len(trainable)
    assert all(g["weight_decay"] == 0.0 for g in groups if g.get("WD_exclude"))


CONFIGS = sorted((CONFIG_DIR / "pretrain").glob("*.yaml"))
OFFICIAL = CONFIG_DIR / "pretrain" / "in1k_vith14_ep300.yaml"  # batch 128, an image folder


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_pretrain_configs_parse_and_describe_a_model(path):
    cfg = load_config(PretrainConfig, path)
    check_values(cfg)
    arch = encoder_arch(cfg.model, cfg.data.crop_size)
    grid = cfg.data.crop_size // arch.patch_size
    enc, pred = MultiBlockMaskSampler((grid, grid), cfg.mask).sample(2, 0)
    assert enc[0].shape[0] == 2 and len(pred) == cfg.mask.num_pred_masks
    assert arch.embed_dim % arch.num_heads == 0


def test_named_sizes_are_the_official_ones():
    from ijepa_toolkit.pretrain.model import ModelSection

    giant = encoder_arch(ModelSection(model_name="vit_giant", patch_size=16), 224)
    assert (giant.embed_dim, giant.depth, giant.num_heads) == (1408, 40, 16)
    assert giant.mlp_ratio == pytest.approx(48 / 11)
    huge = encoder_arch(ModelSection(model_name="vit_huge", patch_size=14), 224)
    assert (huge.embed_dim, huge.depth, huge.num_heads, huge.img_size) == (1280, 32, 16, 224)


@pytest.mark.parametrize("key, value", [
    ("mask.num_pred_masks", "0"), ("mask.pred_mask_scale", "[0.5, 0.2]"),
    ("optimization.ema", "[1.1, 1.0]"), ("model.stop_sigma", "-1"),
])  # fmt: skip
def test_bad_pretraining_values_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be "):  # when the config is built
        load_config(PretrainConfig, OFFICIAL, [f"{key}={value}"])


def test_cross_section_and_folder_checks_name_the_key(tmp_path):
    cfg = load_config(PretrainConfig, OFFICIAL, ["mask.group_size=3"])  # batch 128
    with pytest.raises(ConfigError, match=r"^mask.group_size must be a divisor of data.batch"):
        check_values(cfg)
    cfg = load_config(PretrainConfig, OFFICIAL, [f"data.train_folder={tmp_path / 'no'}"])
    with pytest.raises(ConfigError, match=r"^data.train_folder must be an existing folder"):
        check_folders(cfg)


FEATURENORM_MODES = Path(__file__).parent / "fixtures" / "featurenorm_modes"


@pytest.mark.parametrize(
    "case", ["main_conf_defaults", "small_yaml", "tiny", "ema_end_below_steady"]
)
def test_featurenorm_schedules_match_the_seed(case):
    """``Trainer.lr`` / ``Trainer.ema_beta`` of theAdamColton/elucidating-featurenorm-ijepa
    ``src/trainer.py`` @ eb093c217f3b475981c84332245530fd17bc30c3, at the fixture's steps
    (tests/fixtures/featurenorm_modes/schedules.json), through the config keys."""
    fixture = json.loads((FEATURENORM_MODES / "schedules.json").read_text())[case]
    c = fixture["conf"]
    overrides = [
        "optimization.lr_schedule=warmup_steady_cooldown", "optimization.ema_schedule=three_phase",
        f"optimization.start_lr={c['start_lr']}", f"optimization.lr={c['steady_lr']}",
        f"optimization.final_lr={c['end_lr']}",
        f"optimization.lr_steps=[{c['num_lr_warmup_steps']}, {c['num_lr_steady_steps']}, "
        f"{c['num_lr_cooldown_steps']}]",
        f"optimization.ema_phases=[{c['ema_beta_start']}, {c['ema_beta_steady']}, "
        f"{c['ema_beta_end']}]",
        f"optimization.ema_steps=[{c['ema_beta_warmup_steps']}, {c['ema_beta_steady_steps']}]",
    ]  # fmt: skip
    opt = load_config(PretrainConfig, OFFICIAL, overrides).optimization
    s = Schedules(
        iterations_per_epoch=10, epochs=opt.epochs, warmup_epochs=opt.warmup,
        start_lr=opt.start_lr, lr=opt.lr, final_lr=opt.final_lr, weight_decay=0.05,
        final_weight_decay=0.05, lr_schedule=opt.lr_schedule, lr_steps=tuple(opt.lr_steps),
        ema_schedule=opt.ema_schedule, ema_phases=tuple(opt.ema_phases),
        ema_steps=tuple(opt.ema_steps),
    )  # fmt: skip
    for row in fixture["values"]:
        lr, wd, momentum = s.at(row["step"])  # iteration i reads the seed's global_step i
        assert lr == pytest.approx(row["lr"], abs=1e-6 * max(1.0, abs(row["lr"])))
        assert momentum == pytest.approx(row["ema_beta"], abs=1e-6), row
        assert wd == pytest.approx(0.05)


def test_empty_featurenorm_phases_take_the_next_value():
    """Zero-length phases (the seed divides by zero there): warm-up 0 starts at the steady
    value, cool-down 0 drops to the end value."""
    assert warmup_steady_cooldown_lr(0, 0.1, 1.0, 0.01, 0, 2, 0) == 1.0
    assert warmup_steady_cooldown_lr(3, 0.1, 1.0, 0.01, 0, 2, 0) == pytest.approx(0.01)
    assert three_phase_ema(0, 0.5, 0.9, 0.99, 0, 0) == 0.9
    assert three_phase_ema(1, 0.5, 0.9, 0.99, 0, 0) == pytest.approx(0.99)
