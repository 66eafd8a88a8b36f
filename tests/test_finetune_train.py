"""Finetuning really trains: every tensor moves, drop path is stochastic depth, activation
checkpointing recomputes, a digits run beats its untrained start (with a corrupt image), and a
diverging loss ends the run with one line naming the last good checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath
from torch.utils.data import DataLoader, TensorDataset

from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.data.folder import SafeImageFolder, collate_skip_none
from ijepa_toolkit.data.sampler import ShardSampler
from ijepa_toolkit.data.transforms import eval_transform
from ijepa_toolkit.engine.logger import RunLogger, read_jsonl
from ijepa_toolkit.engine.utils import seed_everything
from ijepa_toolkit.errors import TrainingDiverged
from ijepa_toolkit.finetune import recipe
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.finetune.engine import StepOptions, TrainState, evaluate, train_one_epoch
from ijepa_toolkit.finetune.run import main

REPO = Path(__file__).resolve().parents[1]
FIXTURE = str(REPO / "tests/fixtures/ijepa_vit_p8_d64.pth.tar")
TINY = str(REPO / "src/ijepa_toolkit/configs/finetune/tiny_cpu.yaml")


def fixture_config(**finetune) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.checkpoint, cfg.model.num_heads, cfg.data.img_size = FIXTURE, 4, 32
    cfg.optimization.warmup_epochs = 0.0
    for k, v in finetune.items():
        setattr(cfg.finetune, k, v)
    return cfg


def one_step(cfg: FinetuneConfig, model, tmp_path, images=None) -> None:
    """One optimizer step of ``train_one_epoch`` on 4 (random) images, mixup on."""
    optimizer = recipe.build_optimizer(
        recipe.param_groups(model, cfg.optimization), cfg.optimization, 1e-3
    )
    scheduler = recipe.build_scheduler(optimizer, cfg.optimization, 1)
    images = torch.randn(4, 3, 32, 32) if images is None else images
    data = TensorDataset(images, torch.tensor([0, 1, 2, 1]))
    opts = StepOptions(
        device=torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", enabled=False),
        mixup=recipe.build_mixup(cfg.mixup, 3), steps_per_epoch=1,
    )  # fmt: skip
    log = RunLogger(tmp_path, enabled=False)
    train_one_epoch(model, recipe.build_criterion(cfg.mixup), DataLoader(data, batch_size=4),
                    optimizer, scheduler, TrainState(), opts, log)  # fmt: skip


def test_every_trainable_tensor_changes_after_one_step(tmp_path):
    cfg = fixture_config(drop_path=0.1)
    model = recipe.build_classifier(cfg, num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    one_step(cfg, model, tmp_path)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []

    frozen = recipe.build_classifier(fixture_config(freeze_encoder=True), num_classes=3)
    before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    one_step(cfg, frozen, tmp_path)
    changed = {n for n, p in frozen.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.linear.weight", "head.linear.bias"}


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    cfg = fixture_config()
    model = recipe.build_classifier(cfg, num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TrainingDiverged, match="loss is nan at step 1 .*no checkpoint"):
        one_step(cfg, model, tmp_path, images=torch.full((4, 3, 32, 32), float("nan")))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_drop_path_is_stochastic_depth_in_the_blocks():
    model = recipe.build_classifier(fixture_config(drop_path=0.3), num_classes=3)
    blocks = model.encoder.blocks
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.3) < 1e-6 and rates == sorted(rates)  # timm: fp32
    assert all(isinstance(b.drop_path2, DropPath) for b in blocks[1:])
    assert not any(isinstance(m, (DropPath, torch.nn.Dropout)) for m in model.head.modules())
    x = torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # a different subset of residual paths each pass
    model.eval()
    assert torch.equal(model(x), model(x))


def test_activation_checkpointing_recomputes_block_forwards(tmp_path):
    calls = {}
    for pool in ("avg", "concat4"):
        for enabled in (False, True):
            cfg = fixture_config(grad_checkpointing=enabled, pool=pool)
            model = recipe.build_classifier(cfg, num_classes=3)
            n = [0]
            hook = model.encoder.blocks[0].register_forward_pre_hook
            hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
            one_step(cfg, model, tmp_path)
            calls[pool, enabled] = n[0]  # a pre-hook: recomputation may stop before the end
    assert calls == {("avg", False): 1, ("avg", True): 2, ("concat4", False): 1,
                     ("concat4", True): 2}  # fmt: skip


def test_finetune_digits_beats_untrained_start_and_skips_corrupt_images(tmp_path, caplog):
    data = tmp_path / "digits"
    train, val = build_digits_imagefolder(data, size=32, per_class=30)
    for root in (train, val):
        (root / "4" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    overrides = [
        f"data.train_folder={train}", f"data.val_folder={val}", "data.digits_root=null",
        f"model.checkpoint={FIXTURE}",
        "data.augment=false", "mixup.mixup=0", "mixup.cutmix=0", "optimization.epochs=4",
        "optimization.lr=0.002", "optimization.warmup_epochs=0.5", "finetune.drop_path=0.0",
        f"logging.folder={out}", "logging.log_freq=1",
    ]  # fmt: skip
    cfg = FinetuneConfig()
    cfg.model.checkpoint, cfg.model.num_heads, cfg.data.img_size = FIXTURE, 4, 32
    seed_everything(0)
    start = recipe.build_classifier(cfg, num_classes=10)
    val_ds = SafeImageFolder(val, eval_transform(32, crop_ratio=1.0))
    loader = DataLoader(val_ds, batch_size=64, sampler=ShardSampler(len(val_ds)),
                        collate_fn=collate_skip_none)  # fmt: skip
    with caplog.at_level("WARNING", logger="ijepa_toolkit"):
        untrained = evaluate(start, loader, torch.device("cpu"))["acc1"]
        assert main(["--fname", TINY, *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    final = results["metrics"]["top1"]
    print(f"digits finetune: untrained acc@1 {untrained:.1f} -> {final:.1f}")
    assert final >= untrained + 15.0, (untrained, final)
    assert "zz_corrupt.png" in caplog.text

    assert results["protocol"] == "finetune" and set(results["metrics"]) == {"top1", "top5"}
    assert results["encoder_checkpoint"] == FIXTURE and results["which"] == "target_encoder"
    assert results["output_checkpoint"] == str(out / "checkpoint-last.pth")
    assert results["val_images"] == len(val_ds) - 1 and results["val_skipped"] == 1
    rows = read_jsonl(out / "log.jsonl")
    steps = [r for r in rows if "loss" in r]
    epochs = [r for r in rows if "val_acc1" in r]
    assert len(epochs) == 4 and all({"lr", "grad_norm"} <= set(r) for r in steps)
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert sum(r["train_skipped"] for r in epochs) >= 1
    assert {"config.yaml", "checkpoint-last.pth", "checkpoint-best.pth", "tensorboard"} <= {
        p.name for p in out.iterdir()
    }
    assert main(["--fname", TINY, *overrides, "--eval"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["metrics"]["top1"] == results["best_top1"] and again["eval_only"] is True
    assert again["encoder_checkpoint"] == str(out / "checkpoint-best.pth")
    assert again["output_checkpoint"] is None


def test_low_shot_finetuning_trains_on_the_listed_subset_only(tmp_path, capsys):
    train, val = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=10)
    ds = SafeImageFolder(train)
    listed = [f"{ds.classes[t]}/{Path(p).name}" for p, t in ds.samples][::3]
    (tmp_path / "1percent.txt").write_text("\n".join(listed) + "\n")
    base = [
        f"data.train_folder={train}", f"data.val_folder={val}", "data.digits_root=null",
        "data.batch_size=4", "optimization.epochs=1", "optimization.warmup_epochs=0",
    ]  # fmt: skip
    out = tmp_path / "file"
    assert main(["--fname", TINY, *base, f"subset.file={tmp_path / '1percent.txt'}",
                 f"logging.folder={out}"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["train_images"] == len(listed) < len(ds)
    assert results["steps"] == len(listed) // 4  # one pass over the listed images only
    out = tmp_path / "per_class"
    assert main(["--fname", TINY, *base, "subset.per_class=2", f"logging.folder={out}"]) == 0
    assert json.loads((out / "results.json").read_text())["train_images"] == 20
    (tmp_path / "bad.txt").write_text("no_such_image.png\n")
    status = main(["--fname", TINY, *base, f"subset.file={tmp_path / 'bad.txt'}",
                   f"logging.folder={tmp_path / 'bad'}"])  # fmt: skip
    assert status == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: {tmp_path / 'bad.txt'}: 1 of 1 listed images are not in the "
                    "dataset, e.g. no_such_image.png")  # fmt: skip


def test_nan_loss_is_one_error_line_naming_the_last_good_checkpoint(tmp_path, capsys):
    # lr = inf: step 1 is finite and makes every weight inf/nan, so step 2's loss is nan
    train, val = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=4)
    out = tmp_path / "run"
    args = ["--fname", TINY, f"data.train_folder={train}", f"data.val_folder={val}",
            "data.digits_root=null", f"model.checkpoint={FIXTURE}", "data.batch_size=8",
            "optimization.epochs=1", "optimization.warmup_epochs=0", "optimization.lr=.inf",
            "finetune.checkpoint_every=1", f"logging.folder={out}",
            "logging.tensorboard=false"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: loss is nan at step 2 (epoch 1); stopping before the update "
                       f"(last good checkpoint: {out / 'checkpoint-last.pth'})")  # fmt: skip
    assert not any("Traceback" in line for line in err)
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert saved["step"] == 1 and not (out / "results.json").exists()

    # the folder now holds that run's checkpoint: a fresh start there is refused
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out} holds the outputs of another run (checkpoint-last.pth, log.jsonl): pass "
        "--resume to continue it, --overwrite to replace it, or use a new logging.folder"
    )
    missing = ["--fname", TINY, f"data.train_folder={tmp_path / 'nowhere'}",
               f"data.val_folder={val}", "data.digits_root=null"]  # fmt: skip
    assert main(missing) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: data.train_folder must be an existing folder, got '{tmp_path / 'nowhere'}'"
    )
