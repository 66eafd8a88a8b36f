"""The many-head linear probe: each grid point trains exactly as a head trained alone with its own
learning rate and weight decay, under the cosine or the step schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.eval.linear import lr_schedule, make_heads, make_optimizer, train_heads


def test_step_schedule_divides_every_decay_epochs_after_warmup():
    f = lr_schedule("step", epochs=6, steps_per_epoch=3, warmup_epochs=0, decay_epochs=2)
    assert [f(s) for s in range(18)] == pytest.approx([1.0] * 6 + [0.1] * 6 + [0.01] * 6)
    f = lr_schedule("step", epochs=6, steps_per_epoch=3, warmup_epochs=1, decay_epochs=2)
    assert [f(s) for s in range(7)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 0.1])
    f = lr_schedule("cosine", epochs=2, steps_per_epoch=5, warmup_epochs=0)
    assert [f(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="optimization.schedule must be one of"):
        lr_schedule("linear", 1, 1, 0)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_grid_heads_train_as_if_alone(optimizer):
    torch.manual_seed(0)
    feats, labels = torch.randn(48, 8), torch.randint(0, 3, (48,))
    batches = [(feats[i : i + 16], labels[i : i + 16]) for i in range(0, 48, 16)]
    grid = [(0.1, 0.0), (0.1, 0.5), (0.5, 0.5)]
    heads = make_heads(8, 3, len(grid), batchnorm=True)
    alone = [copy.deepcopy(h) for h in heads]
    factor = lr_schedule("step", epochs=4, steps_per_epoch=3, warmup_epochs=1, decay_epochs=2)
    opt = make_optimizer(heads, grid, optimizer, momentum=0.9)
    train_heads(heads, opt, lambda epoch: batches, 4, 3, factor, DistInfo())

    for head, (lr, wd), trained in zip(alone, grid, heads):
        single = make_optimizer(nn.ModuleList([head]), [(lr, wd)], optimizer, momentum=0.9)
        head.train()
        for step in range(12):
            x, y = batches[step % 3]
            single.param_groups[0]["lr"] = lr * factor(step)
            single.zero_grad()
            nn.functional.cross_entropy(head(x), y).backward()
            single.step()
        for a, b in zip(head.state_dict().values(), trained.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    w = [h.linear.weight.norm().item() for h in heads]
    assert w[1] < w[0] and not math.isclose(w[1], w[2])  # weight decay acted per head
