"""Packed pretraining through main_pretrain.py: exact resume with carried-over images after
SIGKILL, and a 2-process DDP run that trains every image of the global batches exactly once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _tiny_pretrain import assert_same_state, finish, killed_and_resumed, launch, tiny_overrides

from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.data.folder import SafeImageFolder
from ijepa_toolkit.engine.logger import read_jsonl
from ijepa_toolkit.io.read import read_checkpoint
from ijepa_toolkit.pretrain.data import GlobalBatchSampler

PACKING = {"packing.enabled": True, "packing.min_side": 16, "packing.max_side": 32,
           "packing.ctx_budget": 128, "packing.tgt_budget": 32, "logging.rankme_freq": 0,
           "model.arch": "{embed_dim: 32, depth: 2, num_heads: 2}"}  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=8)


def _waiting(ckpt: dict) -> int:
    return sum(len(w["keys"]) for w in ckpt["packing_waiting"])


def test_packed_exact_resume_after_sigkill_keeps_carried_images(digits, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = {**PACKING, "optimization.epochs": 3}
    finish(launch(tiny_overrides(digits, whole, **extra)))
    saved, _ = killed_and_resumed(tiny_overrides(digits, killed, **extra), killed, epochs=3)
    assert _waiting(saved) > 0, "no image was carried over at the checkpoint: nothing to test"
    assert_same_state(whole, killed, ("encoder", "predictor", "target_encoder", "opt",
                                      "packing_waiting"))  # fmt: skip


def test_packed_ddp_two_processes_train_every_image_once(digits, tmp_path):
    extra = {**PACKING, "optimization.epochs": 2}
    one = launch(tiny_overrides(digits, tmp_path / "one", **{**extra, "data.batch_size": 16}))
    finish(one)
    two = launch(tiny_overrides(digits, tmp_path / "two", **{**extra, "data.batch_size": 8}), 2)
    finish(two, timeout=180)
    # the ranks' parts of each step are disjoint and together are the one-process batch
    size = len(SafeImageFolder(digits[0]))
    for epoch in range(2):
        whole = GlobalBatchSampler(size, 16, seed=0)
        parts = [GlobalBatchSampler(size, 8, r, 2, seed=0) for r in range(2)]
        for sampler in (whole, *parts):
            sampler.set_epoch(epoch)
        for batch, p0, p1 in zip(whole, *parts):
            assert not set(p0) & set(p1) and p0 + p1 == batch
    for run, world in (("one", 1), ("two", 2)):
        ckpt = read_checkpoint(tmp_path / run / "checkpoint-last.pth")
        rows = [r for r in read_jsonl(tmp_path / run / "log.jsonl") if "images" in r]
        assert ckpt["world_size"] == world and len(ckpt["packing_waiting"]) == world
        assert len(rows) == ckpt["step"] == 2 * (size // 16)
        assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
        # every image of the 2 epochs was trained on exactly once or is still carried over
        assert sum(r["images"] for r in rows) + _waiting(ckpt) == ckpt["step"] * 16
        assert all(r["images"] < 16 for r in rows[:1])  # carry-over held some back
