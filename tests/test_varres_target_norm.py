"""Batch-norm target normalisation equals the featurenorm seed's on its own tensors."""

from __future__ import annotations

import torch
from _featurenorm import SEED_PAD, load

from ijepa_toolkit.pretrain.targets import TargetNorm, target_token_mask


def test_batchnorm_targets_equal_featurenorm_over_target_tokens_only():
    """``target_norm_mode="batchnorm"``: statistics over the non-padding target tokens, unbiased
    std clamped at 1e-7; the normalised targets the predictor of ``IJEPAModel.forward``
    (src/model.py, theAdamColton/elucidating-featurenorm-ijepa
    @eb093c217f3b475981c84332245530fd17bc30c3) receives. The fixture's padding tokens hold 50.0:
    taking them in would move every value."""
    f = load("target_norm")
    valid = f["sample_ids"] != SEED_PAD
    out = TargetNorm("batchnorm", 16)(f["raw"], valid)
    torch.testing.assert_close(out, f["batchnorm"], atol=1e-5, rtol=0)
    assert float(out[valid].mean().abs()) < 1e-5


def test_running_batchnorms_equal_featurenorm_running_batchnorm():
    """Two training steps of ``RunningBatchNorm(16)`` and of the ``running-batchnorm-singleton``
    mode's ``RunningBatchNorm(1)`` (src/model.py,
    theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3):
    outputs and the running statistics."""
    f = load("target_norm")
    valid = f["sample_ids"] != SEED_PAD
    run = TargetNorm("running_batchnorm", 16, momentum=0.99)
    torch.testing.assert_close(run(f["raw"], valid), f["running1"], atol=1e-5, rtol=0)
    torch.testing.assert_close(run(f["raw2"], valid), f["running2"], atol=1e-5, rtol=0)
    torch.testing.assert_close(run.running_mean, f["running_mean"], atol=1e-6, rtol=0)
    torch.testing.assert_close(run.running_std, f["running_std"], atol=1e-6, rtol=0)
    single = TargetNorm("running_batchnorm_singleton", 16)
    torch.testing.assert_close(single(f["raw"], valid), f["singleton1"], atol=1e-5, rtol=0)
    torch.testing.assert_close(single(f["raw2"], valid), f["singleton2"], atol=1e-5, rtol=0)
    assert single.running_mean.shape == (1,)
    frozen = single.eval()  # evaluation mode: the statistics stay
    before = frozen.running_std.clone()
    frozen(f["raw"] * 3, valid)
    assert torch.equal(frozen.running_std, before)


def test_target_token_mask_is_the_union_of_the_target_blocks():
    rows = torch.tensor([0, 2])
    groups = [(rows, [], [torch.tensor([[0, 1], [3, 4]]), torch.tensor([[5, 1], [0, 0]])]),
              (torch.tensor([1]), [], [torch.tensor([[2, 2]])])]  # fmt: skip
    valid = target_token_mask(groups, (3, 6))
    assert valid.tolist() == [[True, True, False, False, False, True],
                              [False, False, True, False, False, False],
                              [True, False, False, True, True, False]]  # fmt: skip
