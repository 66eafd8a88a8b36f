"""The pretraining-step pieces the step benchmark (bench/pretrain_step.py) relies on: equal numbers
to the official code's operations, and the benchmark's own loss check at a tiny size.

The official operations are facebookresearch/ijepa ``src/train.py`` (the EMA loop
``param_k.data.mul_(m).add_((1.-m) * param_q.detach().data)``) at commit
``52c1ae95d05f743e000e8f10a1f3a79b10cff048``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Block

from ijepa_toolkit.models.vit import block_rows
from ijepa_toolkit.pretrain.model import ema_update_

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("fused", [True, False])
def test_block_rows_are_the_whole_blocks_rows(fused):
    torch.manual_seed(0)
    block = Block(64, 4, qkv_bias=True, drop_path=0.2).train()
    block.attn.fused_attn = fused
    x = torch.randn(6, 30, 64)
    torch.manual_seed(1)
    whole = block(x)[:, 18:]
    torch.manual_seed(1)  # the same drop-path draws
    rows = block_rows(block, x, 18)
    assert rows.shape == (6, 12, 64) and torch.equal(rows, whole)
    block.eval()
    assert torch.equal(block_rows(block, x, 0), block(x))


def test_ema_update_is_bitwise_the_official_loop():
    torch.manual_seed(0)
    source, target = torch.nn.Linear(300, 200), torch.nn.Linear(300, 200)
    official = [p.detach().clone() for p in target.parameters()]
    m = 0.99631  # any momentum: (1 - m) * s is rounded before the add
    for t, s in zip(official, source.parameters()):
        t.mul_(m).add_((1.0 - m) * s.detach())
    ema_update_(target, source, m)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), official))


def test_step_benchmark_checks_equal_losses(capsys):
    spec = importlib.util.spec_from_file_location("bench_pretrain_step", BENCH / "pretrain_step.py")
    step = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = step
    spec.loader.exec_module(step)
    extra = ["model.patch_size=4", "model.arch={embed_dim: 64, depth: 2, num_heads: 4}",
             "model.pred_depth=1", "model.pred_emb_dim=32", "mask.min_keep=4"]  # fmt: skip
    rows = step.compare(rounds=1, reference=True, size=32, extra=extra)
    out = capsys.readouterr().out
    ours, ref = (line.split(": ")[1] for line in out.splitlines() if "losses, steps 1-3" in line)
    assert ours == ref  # the re-implementation computes the same losses, to the printed digit
    measured = [r for r in rows if not r.skipped]
    assert [r.contender for r in measured] == ["official-style re-implementation"]
    assert measured[0].toolkit > 0 and measured[0].other > 0 and measured[0].ratio > 0
    line = next(x for x in out.splitlines() if "GFLOP per step" in x)
    flops = dict(kv.rsplit(" ", 1) for kv in line.split(": ")[1].split(", "))
    # the toolkit's last predictor block computes only its target rows: fewer FLOPs, same losses
    assert 0 < float(flops["toolkit"]) < float(flops["official-style re-implementation"])
    assert any("official-src" in r.skipped for r in rows)
