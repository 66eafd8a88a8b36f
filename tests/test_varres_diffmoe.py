"""DiffMoE MLP: expert-choice token counts in training, predicted dynamic capacity in eval, and
the seed's own outputs (tests/fixtures/featurenorm/diffmoe.safetensors)."""

from __future__ import annotations

import torch
from _featurenorm import load
from torch import nn

from ijepa_toolkit import load_encoder, save_checkpoint
from ijepa_toolkit.models.diffmoe import DiffMoEMlp, moe_aux_loss
from ijepa_toolkit.models.vit import EncoderArch
from ijepa_toolkit.models.vit_variants import create_variant_encoder


def test_training_gives_every_expert_exactly_its_capacity():
    torch.manual_seed(0)
    moe = DiffMoEMlp(16, 32, num_experts=4, capacity=1.0).train()
    x = torch.randn(3, 20, 16)  # 60 tokens pooled over the batch -> 15 per expert
    y = moe(x)
    assert y.shape == x.shape
    assert moe.last_counts.tolist() == [15, 15, 15, 15]
    assert moe.aux_loss > 0
    moe.capacity = 0.5
    moe(x)
    assert moe.last_counts.tolist() == [7, 7, 7, 7]


def test_eval_uses_the_capacity_predictor_and_varies_per_expert():
    torch.manual_seed(0)
    moe = DiffMoEMlp(16, 32, num_experts=4).eval()
    with torch.no_grad():
        moe.capacity_predictor[2].bias.copy_(torch.tensor([-20.0, 20.0, 0.0, -20.0]))
        x = torch.randn(2, 30, 16)
        y = moe(x)
        counts = moe.last_counts.tolist()
        assert counts[0] == 0 and counts[1] == 60 and counts[3] == 0 and 0 < counts[2] < 60
        # per-token routing: a token's output does not depend on the rest of the batch
        assert torch.allclose(moe(x[:1]), y[:1], atol=1e-6)
        gate = (torch.tanh(moe.router(x)) + 1) / 2  # the seed's gate, not a softmax
        expected = gate[..., 1:2] * moe.experts[1](x)
        on2 = moe.capacity_predictor(x)[..., 2:3].sigmoid() >= 0.5
        expected = expected + on2 * gate[..., 2:3] * moe.experts[2](x)
        assert torch.allclose(y, expected, atol=1e-5)


def test_bce_trains_the_capacity_predictor_towards_the_expert_choice():
    torch.manual_seed(0)
    moe = DiffMoEMlp(8, 16, num_experts=2, capacity=1.0).train()
    opt = torch.optim.Adam(moe.capacity_predictor.parameters(), lr=0.05)
    x = torch.randn(4, 32, 8)
    first = None
    for _ in range(60):
        moe(x)
        opt.zero_grad()
        moe_aux_loss(moe).backward()
        opt.step()
        first = first if first is not None else float(moe.aux_loss.detach())
    assert float(moe.aux_loss.detach()) < 0.5 * first


def test_moe_encoder_loads_and_switches_with_eval(tmp_path):
    torch.manual_seed(0)
    arch = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)
    enc = create_variant_encoder(arch, moe_experts=3, moe_threshold=0.3)
    x = torch.randn(2, 3, 16, 16)
    enc.train()(x)
    train_counts = enc.blocks[0].mlp.last_counts.tolist()
    assert train_counts == [10, 10, 10]  # 32 tokens, capacity 1, 3 experts
    path = tmp_path / "moe.pth"
    save_checkpoint({"target_encoder": enc.state_dict()}, path)
    loaded = load_encoder(path, num_heads=2)
    threshold = enc.blocks[0].mlp.threshold  # the moving average of the training step, saved
    assert not loaded.training and torch.equal(loaded.blocks[0].mlp.threshold, threshold)
    assert not torch.allclose(threshold, torch.full_like(threshold, 0.3))
    with torch.no_grad():
        assert torch.allclose(loaded(x), enc.eval()(x), atol=1e-6)
    assert loaded.forward_features(x).shape == (2, 16, 32)


def _seed_moe(f: dict) -> tuple[DiffMoEMlp, nn.LayerNorm]:
    """The toolkit module holding the fixture's ``DiffMoeMLP`` weights, and its integrated norm."""
    moe = DiffMoEMlp(16, 64, num_experts=4, capacity=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(f["gate_proj.weight"])
        for i in (0, 2):
            moe.capacity_predictor[i].weight.copy_(f[f"capacity_predictor.{i}.weight"])
            moe.capacity_predictor[i].bias.copy_(f[f"capacity_predictor.{i}.bias"])
        for e, expert in enumerate(moe.experts):
            expert.fc1.weight.copy_(f["fc1s"][e])
            expert.fc1.bias.copy_(f["b1s"][e])
            expert.fc2.weight.copy_(f["fc2s"][e])
            expert.fc2.bias.copy_(f["b2s"][e])
    norm = nn.LayerNorm(16)
    norm.load_state_dict({"weight": f["norm.weight"], "bias": f["norm.bias"]})
    return moe, norm


def test_two_training_steps_and_eval_equal_the_seed_diffmoe():
    """``DiffMoeMLP`` of diffmoe/diffmoe.py
    (theAdamColton/diffmoe@faf2b49ff5ba8ea64292f712f443016a5692ff70, the commit
    elucidating-featurenorm-ijepa pins): ``(tanh + 1) / 2`` gate, 2-layer capacity predictor and
    its BCE, the per-expert moving-average threshold over two training steps, then eval routing
    by that threshold; the seed's module adds the residual and holds the norm."""
    f = load("diffmoe")
    moe, norm = _seed_moe(f)
    moe.train()
    for step in (1, 2):
        x = f[f"x{step}"]
        y = x + moe(norm(x))
        torch.testing.assert_close(y, f[f"y{step}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(moe.aux_loss, f[f"loss{step}"], atol=1e-6, rtol=0)
        torch.testing.assert_close(moe.threshold, f[f"th{step}"], atol=1e-6, rtol=0)
    moe.eval()
    with torch.no_grad():
        y = f["x3"] + moe(norm(f["x3"]))
    torch.testing.assert_close(y, f["y3"], atol=1e-5, rtol=0)
    assert 0 < int(moe.last_counts.sum()) < 4 * 24  # dynamic: neither none nor every pair


def test_aux_loss_is_the_mean_over_blocks():
    """The featurenorm ``Encoder`` divides the summed DiffMoE losses by its block count
    (src/model.py, theAdamColton/elucidating-featurenorm-ijepa
    @eb093c217f3b475981c84332245530fd17bc30c3)."""
    blocks = nn.ModuleList(DiffMoEMlp(8, 16, num_experts=2) for _ in range(3))
    for m, value in zip(blocks, (0.2, 0.5, 1.1)):
        m.aux_loss = torch.tensor(value)
    assert abs(float(moe_aux_loss(blocks)) - 0.6) < 1e-6
