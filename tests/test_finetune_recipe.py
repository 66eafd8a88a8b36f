"""Finetuning recipe pieces: layer decay vs MAE's rule, schedule, loss choice, Mixup, odd batch,
concat4 head, rank shards."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _direct import concat4_by_hand
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

from ijepa_toolkit.data.sampler import ShardSampler
from ijepa_toolkit.finetune import recipe
from ijepa_toolkit.finetune.config import FinetuneConfig, MixupSection, OptimizationSection
from ijepa_toolkit.finetune.run import main
from ijepa_toolkit.models.heads import EncoderClassifier
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

DEPTH, DECAY = 3, 0.6
REPO = Path(__file__).resolve().parents[1]
FIXTURE = str(REPO / "tests/fixtures/ijepa_vit_p8_d64.pth.tar")
TINY = str(REPO / "src/ijepa_toolkit/configs/finetune/tiny_cpu.yaml")


def tiny_classifier(pool="avg"):
    torch.manual_seed(0)
    enc = create_encoder(EncoderArch(img_size=16, patch_size=8, embed_dim=32, depth=DEPTH,
                                     num_heads=4))  # fmt: skip
    return EncoderClassifier(enc, num_classes=5, pool=pool)


def mae_layer_id(name: str) -> int:
    """MAE's ``get_layer_id_for_vit`` (util/lr_decay.py), on names without ``encoder.``."""
    name = name[len("encoder.") :] if name.startswith("encoder.") else name
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return DEPTH + 1


def scales_of(groups, model):
    by_id = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def test_layer_decay_scales_equal_mae_param_groups_lrd():
    model = tiny_classifier()
    opt = OptimizationSection(layer_decay=DECAY, weight_decay=0.05)
    got = scales_of(recipe.param_groups(model, opt), model)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        scale = DECAY ** (DEPTH + 1 - mae_layer_id(name))
        wd = 0.0 if p.ndim == 1 or name == "encoder.pos_embed" else 0.05
        assert got[name] == (pytest.approx(scale), wd), name
    assert got["head.linear.weight"][0] == got["encoder.norm.weight"][0] == 1.0
    assert got[f"encoder.blocks.{DEPTH - 1}.mlp.fc1.weight"][0] == pytest.approx(DECAY)
    smallest = min(s for s, _ in got.values())
    assert (
        got["encoder.patch_embed.proj.weight"][0] == smallest == pytest.approx(DECAY ** (DEPTH + 1))
    )
    # Why EncoderClassifier has its own group_matcher: timm's ViT matcher puts the final norm
    # with the last block (scale DECAY instead of 1.0).
    enc = model.encoder
    timm_scales = scales_of(param_groups_layer_decay(enc, layer_decay=DECAY), enc)
    assert timm_scales["norm.weight"][0] == timm_scales[f"blocks.{DEPTH - 1}.norm1.weight"][0]


def test_schedule_is_mae_rule_per_step_times_each_group_scale():
    model = tiny_classifier()
    opt = OptimizationSection(epochs=4, warmup_epochs=1, min_lr=1e-6, layer_decay=DECAY)
    lr, steps_per_epoch = 1e-3, 5
    optimizer = recipe.build_optimizer(recipe.param_groups(model, opt), opt, lr)
    scheduler = recipe.build_scheduler(optimizer, opt, steps_per_epoch)
    for step in range(opt.epochs * steps_per_epoch):
        scheduler.step_update(step)
        epoch = step / steps_per_epoch  # MAE util/lr_sched.adjust_learning_rate
        if epoch < opt.warmup_epochs:
            want = lr * epoch / opt.warmup_epochs
        else:
            t = (epoch - opt.warmup_epochs) / (opt.epochs - opt.warmup_epochs)
            want = opt.min_lr + (lr - opt.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(want * g["lr_scale"], rel=1e-9, abs=1e-15), step


def test_loss_follows_mixing_and_smoothing():
    assert isinstance(recipe.build_criterion(MixupSection()), SoftTargetCrossEntropy)
    assert isinstance(recipe.build_criterion(MixupSection(mixup=0.0)), SoftTargetCrossEntropy)
    smooth = recipe.build_criterion(MixupSection(mixup=0.0, cutmix=0.0, smoothing=0.1))
    assert isinstance(smooth, LabelSmoothingCrossEntropy) and smooth.smoothing == 0.1
    plain = recipe.build_criterion(MixupSection(mixup=0.0, cutmix=0.0, smoothing=0.0))
    assert type(plain) is torch.nn.CrossEntropyLoss
    assert recipe.build_mixup(MixupSection(mixup=0.0, cutmix=0.0), 7) is None


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_targets_have_the_dataset_class_count(mixup, cutmix):
    mix = recipe.build_mixup(MixupSection(mixup=mixup, cutmix=cutmix, smoothing=0.1), 7)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 6])
    xm, ym = mix(x.clone(), y)
    assert xm.shape == x.shape and ym.shape == (6, 7)
    torch.testing.assert_close(ym.sum(dim=1), torch.ones(6))
    assert ym.min() > 0  # smoothing spreads mass over all 7 classes


def test_odd_batch_with_mixing_is_refused_up_front(capsys):
    assert main(["--fname", TINY, "data.batch_size=15", "mixup.mixup=0.8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.batch_size=15 is odd" in err[0] and "Mixup" in err[0]


@pytest.mark.parametrize("key, value", [("mixup.mode", "pixel"), ("optimization.layer_decay", "0"),
                                        ("finetune.drop_path", "1.2")])  # fmt: skip
def test_bad_recipe_values_are_refused_up_front(key, value, capsys):
    # mixup off: a bad mode would otherwise pass silently
    assert main(["--fname", TINY, f"{key}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{key}" in err[0], err
    assert f"'{key}' = '{value}': expected one of" in err[0] or f"{key} must be " in err[0]


def test_concat4_classifier_from_config_matches_direct_computation():
    cfg = FinetuneConfig()
    cfg.model.checkpoint, cfg.model.num_heads = FIXTURE, 4
    cfg.data.img_size, cfg.finetune.pool, cfg.finetune.drop_path = 32, "concat4", 0.0
    model = recipe.build_classifier(cfg, num_classes=3).eval()
    enc = model.encoder
    assert model.head.linear.in_features == 4 * enc.embed_dim == 256
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        direct = model.head(concat4_by_hand(enc, x))
        torch.testing.assert_close(model(x), direct, rtol=0, atol=1e-6)


def test_shard_sampler_eval_covers_once_train_matches_one_process():
    n, world = 11, 3
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
    one = ShardSampler(n, shuffle=True, seed=5)
    two = [ShardSampler(n, r, 2, shuffle=True, seed=5) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(3)
    b = 2  # per-rank batch; one process uses 2 * b
    order = list(one)
    ranks = [list(s) for s in two]
    for k in range(len(ranks[0]) // b):
        global_batch = set(ranks[0][k * b : (k + 1) * b] + ranks[1][k * b : (k + 1) * b])
        assert global_batch == set(order[2 * b * k : 2 * b * (k + 1)])
    two[1].set_epoch(3, start=2)
    assert list(two[1]) == ranks[1][2:] and len(two[1]) == len(ranks[1]) - 2
    one.set_epoch(4)
    assert list(one) != order


@pytest.mark.parametrize("name", ["tiny_cpu", "vit_h14_in1k", "vit_h16_448_in1k", "vit_g16_in1k"])
def test_shipped_configs_parse_and_pass_checks(name):
    from ijepa_toolkit.config import load_config
    from ijepa_toolkit.finetune.run import check_config

    cfg = load_config(FinetuneConfig, REPO / f"src/ijepa_toolkit/configs/finetune/{name}.yaml")
    check_config(cfg)
    effective = (
        cfg.data.batch_size * cfg.optimization.accum_iter * (1 if name == "tiny_cpu" else 64)
    )
    assert name == "tiny_cpu" or effective == 1024  # MAE's ViT-H batch on 8 nodes x 8 GPUs


def test_randaugment_posterize_at_magnitude_10_gives_black_not_an_error():
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    recipe.train_transform(FinetuneConfig().data)  # installs the 0-bit-safe posterize
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)
    assert out.size == img.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    kept = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(img)  # 2 bits kept
    assert kept.getpixel((0, 0)) == (192, 64, 0)
