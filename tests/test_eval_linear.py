"""The many-head linear probe: each grid point trains exactly as a head trained alone with its own
learning rate and weight decay, under the cosine or the step schedule; LARS is MAE's."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.eval.linear import cached_batches
from ijepa_toolkit.eval.linear_heads import build_scheduler, make_heads, make_optimizer, train_heads


def mae_lr(step: int, steps_per_epoch: int, epochs: int, warmup: float, base: float) -> float:
    """MAE's util/lr_sched.adjust_learning_rate at a fractional epoch (min_lr 0)."""
    epoch = step / steps_per_epoch
    if epoch < warmup:
        return base * epoch / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def step_lr(step: int, steps_per_epoch: int, warmup: int, every: int, base: float) -> float:
    """Linear warmup from 0, then base x 0.1 every ``every`` epochs from the start (VISSL)."""
    if step < warmup * steps_per_epoch:
        return base * step / (warmup * steps_per_epoch)
    return base * 0.1 ** (step // (every * steps_per_epoch))


def scheduled_lrs(name: str, steps: int, **kw) -> list[list[float]]:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1.0, 0.5)]
    opt = torch.optim.SGD(groups, lr=1.0)
    scheduler = build_scheduler(opt, name, **kw)
    out = []
    for step in range(steps):
        scheduler.step_update(step)
        out.append([g["lr"] for g in opt.param_groups])
    return out


def test_schedules_are_maes_cosine_and_vissls_steps_per_group():
    got = scheduled_lrs("cosine", 20, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    want = [mae_lr(s, 5, 4, 1, b) for s in range(20) for b in (1.0, 0.5)]
    assert sum(got, []) == pytest.approx(want, abs=1e-12)
    got = scheduled_lrs("step", 18, epochs=6, steps_per_epoch=3, warmup_epochs=1, decay_epochs=2)
    want = [step_lr(s, 3, 1, 2, b) for s in range(18) for b in (1.0, 0.5)]
    assert sum(got, []) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_grid_heads_train_as_if_alone(optimizer):
    torch.manual_seed(0)
    feats, labels = torch.randn(48, 8), torch.randint(0, 3, (48,))
    batches = [(feats[i : i + 16], labels[i : i + 16]) for i in range(0, 48, 16)]
    grid = [(0.1, 0.0), (0.1, 0.5), (0.5, 0.5)]
    heads = make_heads(8, 3, len(grid), batchnorm=True)
    alone = [copy.deepcopy(h) for h in heads]
    opt = make_optimizer(heads, grid, optimizer, momentum=0.9)
    scheduler = build_scheduler(opt, "step", 4, 3, warmup_epochs=1, decay_epochs=2)
    train_heads(heads, opt, lambda epoch: batches, 4, 3, scheduler, DistInfo())

    for head, (lr, wd), trained in zip(alone, grid, heads):
        single = make_optimizer(nn.ModuleList([head]), [(lr, wd)], optimizer, momentum=0.9)
        head.train()
        for step in range(12):
            x, y = batches[step % 3]
            for group in single.param_groups:
                group["lr"] = step_lr(step, 3, 1, 2, lr)
            single.zero_grad()
            nn.functional.cross_entropy(head(x), y).backward()
            single.step()
        for a, b in zip(head.state_dict().values(), trained.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    w = [h.linear.weight.norm().item() for h in heads]
    assert not math.isclose(w[0], w[1]) and not math.isclose(w[1], w[2])  # wd, lr per head


def mae_lars_step(params, state, lr, wd, momentum=0.9, trust=0.001):
    """MAE's util/lars.py step: weight decay and trust ratio on tensors with ndim > 1 only."""
    for p in params:
        dp = p.grad
        if p.ndim > 1:
            dp = dp.add(p, alpha=wd)
            p_norm, u_norm = torch.norm(p), torch.norm(dp)
            q = torch.where(p_norm > 0, torch.where(u_norm > 0, trust * p_norm / u_norm, 1.0), 1.0)
            dp = dp.mul(q)
        mu = state.setdefault(p, torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def test_lars_is_maes_lars_also_without_weight_decay():
    torch.manual_seed(0)
    feats, labels = torch.randn(32, 8), torch.randint(0, 3, (32,))
    ours = make_heads(8, 3, 1, batchnorm=True)
    ref = copy.deepcopy(ours[0])
    opt = make_optimizer(ours, [(2.0, 0.0)], "lars", momentum=0.9)
    state = {}
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(ours[0](feats), labels).backward()
        opt.step()
        ref.zero_grad()
        nn.functional.cross_entropy(ref(feats), labels).backward()
        with torch.no_grad():
            mae_lars_step(list(ref.parameters()), state, lr=2.0, wd=0.0)
    for a, b in zip(ours[0].parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cached_batches_read_only_the_fit_rows_from_the_memmap(tmp_path):
    import numpy as np

    feats = np.lib.format.open_memmap(tmp_path / "f.npy", "w+", np.float32, (40, 3))
    feats[:] = np.arange(120, dtype=np.float32).reshape(40, 3)  # row i holds 3i, 3i+1, 3i+2
    labels = np.arange(40) % 4
    rows = np.arange(0, 40, 2)  # the fit rows; odd rows are held out
    seen = []
    for rank in (0, 1):
        batches, steps = cached_batches(feats, labels, rows, 4, 0, rank, 2, torch.device("cpu"))
        assert steps == 2  # 20 rows / 2 ranks / batch 4, full batches only
        for x, y in batches(epoch=3):
            i = (x[:, 0] / 3).long()
            assert torch.equal(x, torch.from_numpy(feats[i.numpy()])) and torch.equal(y, i % 4)
            seen += i.tolist()
    assert len(seen) == len(set(seen)) == 16 and set(seen) <= set(rows.tolist())
