"""The featurenorm seed's LiDAR protocol and run modes against the seed's own functions
(theAdamColton/elucidating-featurenorm-ijepa @ eb093c217f3b475981c84332245530fd17bc30c3;
fixtures in tests/fixtures/featurenorm_modes/, see its README) and direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from _tiny_pretrain import CONFIG, tiny_overrides
from safetensors.torch import load_file

from ijepa_toolkit.config import load_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.data.folder import SafeImageFolder
from ijepa_toolkit.data.transforms import eval_transform
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.engine.logger import read_jsonl
from ijepa_toolkit.models.vit import EncoderArch, create_encoder, encode_masked
from ijepa_toolkit.pretrain import seed_modes
from ijepa_toolkit.pretrain.layer_probe import layer_features, layer_probe
from ijepa_toolkit.pretrain.probes import (
    context_features,
    featurenorm_lidar,
    featurenorm_lidar_probe,
    seed_images,
)
from ijepa_toolkit.pretrain.schedules import three_phase_ema, warmup_steady_cooldown_lr
from ijepa_toolkit.pretrain.seed_modes import (
    SeedModesConfig,
    mean_loss_map,
    open_checkpoint,
    run,
    sample_losses,
    token_losses,
)
from ijepa_toolkit.pretrain.seed_views import SeedViews, ViewOptions
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer

FIXTURES = Path(__file__).parent / "fixtures" / "featurenorm_modes"
TINY_VIEWS = ["logging.lidar_sides=[16, 32]", "logging.lidar_window=2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=8)


@pytest.mark.parametrize("case", ["random", "structured", "low_rank", "collapsed"])
def test_lidar_formula_matches_the_seed(case):
    """``compute_lidar_score`` of src/lidar.py @ eb093c21 on fixed (n, q, D) embeddings: equal
    within 1e-5 (relative) to the seed run in float64; its float32 run (what the seed logs) is
    within 1e-3, 1e-2 for the ill-conditioned low-rank case (scale 0.02, delta 1e-6)."""
    t = load_file(FIXTURES / "lidar.safetensors")
    value = featurenorm_lidar(t[f"{case}.features"])
    assert value == pytest.approx(float(t[f"{case}.lidar64"]), rel=1e-5)
    rel32 = 1e-2 if case == "low_rank" else 1e-3
    assert value == pytest.approx(float(t[f"{case}.lidar32"]), rel=rel32)
    assert value == pytest.approx(featurenorm_lidar(t[f"{case}.features"].float()), rel=1e-5)


@pytest.mark.parametrize("name", ["seed_defaults", "tiny"])
def test_views_are_drawn_exactly_as_the_seed(name):
    """``RandomImageResizer`` + ``ImagePatcher`` + ``ContextTargetSplitter`` of src/dataset.py
    @ eb093c21 chained as ``get_repeated_data`` chains them, with ``random.Random(11)`` /
    ``random.Random(12)``: the same sizes, pixels (tiny) and context / target positions in the
    seed's token order, view after view."""
    meta = json.loads((FIXTURES / "views.json").read_text())[name]
    t = load_file(FIXTURES / "views.safetensors")
    c = meta["config"]
    keys = (
        "patch_size",
        "mask_window_size",
        "min_side_length",
        "max_side_length",
        "min_context_capacity",
        "max_context_capacity",
        "absolute_max_context_capacity",
    )
    options = ViewOptions(*(c[k] for k in keys))
    assert (options.context_length, options.target_length) == (
        meta["context_length"], meta["target_length"])  # fmt: skip
    views = SeedViews(options, meta["resizer_seed"], meta["splitter_seed"])
    for i in range(len(meta["sizes"])):
        image = PIL.Image.fromarray(t[f"{name}.image{i}"].numpy())
        for v in range(meta["views"]):
            key = f"{name}.image{i}.view{v}"
            resized = views.resize(image)
            assert (resized.size[1], resized.size[0]) == tuple(t[f"{key}.shape"].tolist())
            if f"{key}.pixels" in t:
                assert torch.equal(torch.from_numpy(np.array(resized)), t[f"{key}.pixels"])
            gw = resized.size[0] // options.patch
            ctx, tgt = views.split(resized.size[1] // options.patch, gw)
            for index, part in ((ctx, "ctx"), (tgt, "tgt")):
                positions = torch.stack([index // gw, index % gw], -1)
                assert torch.equal(positions, t[f"{key}.{part}_pos"]), (key, part)


def test_context_features_are_the_mean_of_the_encoded_context_tokens():
    torch.manual_seed(0)
    enc = create_encoder(EncoderArch(img_size=32, patch_size=4, embed_dim=32, depth=2,
                                     num_heads=4)).eval()  # fmt: skip
    sampler = SeedViews(ViewOptions(patch=4, window=2, min_side=16, max_side=32), 3, 4)
    image = PIL.Image.fromarray((torch.rand(30, 34, 3) * 255).byte().numpy())
    views = [sampler(image) for _ in range(5)]
    assert len({v.grid for v in views}) > 1  # several sizes in one padded batch
    feats = context_features(enc, views, 4, torch.device("cpu"))
    with torch.no_grad():
        for view, feat in zip(views, feats):
            direct = encode_masked(enc, view.pixels[None], view.ctx[None]).mean(dim=1)[0]
            assert torch.allclose(feat, direct, atol=1e-5)


def test_pretraining_run_logs_the_featurenorm_lidar_of_the_context_encoder(digits, tmp_path):
    extra = {"optimization.epochs": 1, "logging.lidar_freq": 1, "logging.rankme_freq": 0,
             "logging.lidar_protocol": "featurenorm", "logging.lidar_images": 12,
             "logging.lidar_views": 3, "optimization.lr_schedule": "warmup_steady_cooldown",
             "optimization.lr_steps": "[1, 0, 2]", "optimization.ema_schedule": "three_phase",
             "optimization.ema_phases": "[0.5, 0.9, 0.99]",
             "optimization.ema_steps": "[1, 1]"}  # fmt: skip
    cfg = load_config(PretrainConfig, CONFIG, [*tiny_overrides(digits, tmp_path, **extra),
                                               *TINY_VIEWS])  # fmt: skip
    assert cfg.logging.lidar_counts() == (12, 3)
    trainer = Pretrainer(cfg, DistInfo())
    metrics = trainer.run()
    trainer.log.close()
    assert 1 <= metrics["lidar_init"] <= 12 and 1 <= metrics["lidar"] <= 12
    # the seed's schedules reach the optimizer and the EMA: iteration i (row step i + 1) uses i
    o = cfg.optimization
    rows = [r for r in read_jsonl(tmp_path / "log.jsonl") if "momentum" in r]
    assert len(rows) == 3  # 60 training digits, batch 16: warm-up, steady, cool-down
    for r in rows:
        i = r["step"] - 1
        assert r["lr"] == pytest.approx(
            warmup_steady_cooldown_lr(i, o.start_lr, o.lr, o.final_lr, 1, 0, 2)
        )
        assert r["momentum"] == pytest.approx(three_phase_ema(i, 0.5, 0.9, 0.99, 1, 1))
    options = cfg.logging.view_options(4)
    folder, cpu = Path(cfg.data.train_folder), torch.device("cpu")
    # the same views at every call, scored on the context encoder (not the target encoder),
    # leaving the training RNG alone
    rng = torch.get_rng_state()
    assert featurenorm_lidar_probe(trainer.encoder, folder, options, cpu, 12, 3) == metrics["lidar"]
    assert torch.equal(rng, torch.get_rng_state())
    target = featurenorm_lidar_probe(trainer.target_encoder, folder, options, cpu, 12, 3)
    assert target != metrics["lidar"]


def test_featurenorm_counts_default_to_the_seeds():
    cfg = load_config(PretrainConfig, CONFIG, ["logging.lidar_protocol=featurenorm"])
    assert cfg.logging.lidar_counts() == (1000, 50)
    assert load_config(PretrainConfig, CONFIG).logging.lidar_counts() == (256, 4)


# -- run modes (pretrain/seed_modes.py) on a tiny pretrained checkpoint ---------------------


@pytest.fixture(scope="module")
def checkpoint(digits, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    extra = {"optimization.epochs": 1, "logging.rankme_freq": 0}
    cfg = load_config(PretrainConfig, CONFIG, tiny_overrides(digits, folder, **extra))
    trainer = Pretrainer(cfg, DistInfo())
    trainer.run()
    trainer.log.close()
    return trainer.ckpt_path


def _modes_cfg(digits, checkpoint, out, **extra) -> SeedModesConfig:
    opts = {"modes.checkpoint": checkpoint, "data.train_folder": digits[0],
            "data.val_folder": digits[1], "data.image_size": 32, "data.batch_size": 4,
            "modes.sides": "[16, 32]", "logging.folder": out, "meta.device": "cpu",
            **extra}  # fmt: skip
    return load_config(SeedModesConfig, None, [f"{k}={v}" for k, v in opts.items()])


def test_mean_loss_map_is_the_per_position_mean_of_directly_computed_losses(digits, checkpoint,
                                                                            tmp_path):  # fmt: skip
    cfg = _modes_cfg(digits, checkpoint, tmp_path, **{"modes.batches": 2})
    trainer = open_checkpoint(cfg)
    numbers = mean_loss_map(trainer, cfg)
    # the same views (same seeds), each through the official masked path on its own
    options = ViewOptions(4, 2, 32, 32)
    pictures = seed_images(SafeImageFolder(digits[0]), 8, options, cfg.meta.seed)
    sampler = SeedViews(options, cfg.meta.seed, cfg.meta.seed + 1)
    sums, counts = torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, 8)
    with torch.no_grad():
        for image in pictures:
            v = sampler(image)
            x = v.pixels[None]
            h = trainer.target_norm(trainer.target_encoder.forward_features(x))[:, v.tgt]
            z = trainer.predictor(encode_masked(trainer.encoder, x, [v.ctx[None]]), [v.ctx[None]],
                                  [v.tgt[None]])  # fmt: skip
            loss = torch.nn.functional.smooth_l1_loss(z, h, reduction="none").mean(-1)[0]
            for index, value in zip(v.tgt.tolist(), loss.tolist()):
                sums[index // 8, index % 8] += value
                counts[index // 8, index % 8] += 1
    assert numbers["images"] == 8 and numbers["counts"] == counts.long().tolist()
    expected = sums / counts.clamp(min=1)
    assert torch.allclose(torch.tensor(numbers["mean_loss"], dtype=torch.float64), expected,
                          atol=1e-5)  # fmt: skip


def test_sample_losses_average_each_views_losses(digits, checkpoint, tmp_path):
    cfg = _modes_cfg(digits, checkpoint, tmp_path, **{"modes.images": 3, "modes.views": 5})
    trainer = open_checkpoint(cfg)
    numbers, pictures = sample_losses(trainer, cfg)
    options = ViewOptions(4, 2, 16, 32)
    images = seed_images(SafeImageFolder(digits[0]), 3, options, cfg.meta.seed)
    sampler = SeedViews(options, cfg.meta.seed, cfg.meta.seed + 1)
    for i, image in enumerate(images):
        views = [sampler(image) for _ in range(5)]
        one = [token_losses(trainer, [v])["loss"] for v in views]  # one view per batch
        assert numbers["sample_mean_loss"][i] == pytest.approx(
            float(torch.stack([t.mean() for t in one]).mean()), rel=1e-5)  # fmt: skip
        assert numbers["sample_loss_variance"][i] == pytest.approx(
            float(torch.stack([t.var() for t in one]).mean()), rel=1e-4)  # fmt: skip
        assert torch.equal(pictures[i][0].pixels, views[0].pixels)
        rows = max(v.grid[0] for v in views)
        assert pictures[i][1].shape[0] == rows


def test_validate_probes_every_layer_of_the_target_encoder(digits, checkpoint, tmp_path):
    cfg = _modes_cfg(digits, checkpoint, tmp_path, **{"modes.probe_epochs": 5,
                                                      "modes.probe_batch_size": 32})  # fmt: skip
    trainer = open_checkpoint(cfg)
    enc, cpu = trainer.target_encoder, torch.device("cpu")
    feats, labels, classes = layer_features(enc, Path(digits[1]), 32, cpu)
    assert feats.shape == (len(labels), enc.arch.depth + 1, enc.embed_dim) and classes == 10
    image = SafeImageFolder(digits[1], transform=eval_transform(32, crop_ratio=1.0))[0][0][None]
    with torch.no_grad():
        x = enc._pos_embed(enc.patch_embed(image))
        direct = [x.mean(1)]
        for block in enc.blocks:
            x = block(x)
            direct.append(x.mean(1))
    assert torch.allclose(feats[0], torch.cat(direct), atol=1e-5)
    numbers = run("validate", cfg)
    train, train_labels, _ = layer_features(enc, Path(digits[0]), 32, cpu)
    expected = layer_probe(train, train_labels, feats, labels, 10, 1e-3, 5, 32, cfg.meta.seed)
    assert numbers["accuracies"] == expected and len(expected) == enc.arch.depth + 1
    assert numbers["acc@1"] == max(expected)
    saved = json.loads((tmp_path / "validate.json").read_text())
    assert saved["depth000_acc@1"] == expected[0] and (tmp_path / "validate.png").is_file()


def test_layer_probe_separates_an_informative_layer_from_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    centres = torch.randn(3, 8, generator=g) * 4
    informative = centres[y] + torch.randn(300, 8, generator=g) * 0.3
    x = torch.stack([torch.randn(300, 8, generator=g), informative], dim=1)  # (N, 2 layers, D)
    acc = layer_probe(x[:200], y[:200], x[200:], y[200:], 3, lr=1e-2, epochs=30, batch_size=64)
    assert len(acc) == 2 and acc[1] == 100.0 and acc[0] < 60


def test_cli_writes_pngs_and_json(digits, checkpoint, tmp_path, capsys):
    args = [f"data.train_folder={digits[0]}", "data.image_size=32", "data.batch_size=4",
            "modes.batches=1", "modes.images=2", "modes.views=2", "modes.sides=[16, 32]",
            f"logging.folder={tmp_path}", "meta.device=cpu"]  # fmt: skip
    assert seed_modes.main(["plot-mean-loss", "--checkpoint", str(checkpoint), *args]) == 0
    assert seed_modes.main(["plot-sample-losses", "--checkpoint", str(checkpoint), *args]) == 0
    written = {p.name for p in tmp_path.iterdir()}
    assert {
        "mean-loss.json",
        "mean_loss.png",
        "sample-losses.json",
        "sample-0000.png",
        "sample-0001.png",
        "loss_histogram.png",
        "variance_histogram.png",
    } <= written
    assert PIL.Image.open(tmp_path / "mean_loss.png").size == (1000, 625)
    mean = json.loads((tmp_path / "mean-loss.json").read_text())
    assert len(mean["mean_loss"]) == 8 and mean["images"] == 4
    assert seed_modes.main(["validate", "--checkpoint", str(tmp_path / "none.pth"), *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: modes.checkpoint")
