"""DiffMoE MLP: expert-choice token counts in training, predicted dynamic capacity in eval."""

from __future__ import annotations

import torch

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
        moe.capacity_predictor.bias.copy_(torch.tensor([-20.0, 20.0, 0.0, -20.0]))
        x = torch.randn(2, 30, 16)
        y = moe(x)
        counts = moe.last_counts.tolist()
        assert counts[0] == 0 and counts[1] == 60 and counts[3] == 0 and 0 < counts[2] < 60
        # per-token routing: a token's output does not depend on the rest of the batch
        assert torch.allclose(moe(x[:1]), y[:1], atol=1e-6)
        expected = moe.router(x).softmax(-1)[..., 1:2] * moe.experts[1](x)
        on2 = moe.capacity_predictor(x)[..., 2:3] > 0
        expected = expected + on2 * moe.router(x).softmax(-1)[..., 2:3] * moe.experts[2](x)
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
    assert not loaded.training and abs(float(loaded.blocks[0].mlp.threshold) - 0.3) < 1e-6
    with torch.no_grad():
        assert torch.allclose(loaded(x), enc.eval()(x), atol=1e-6)
    assert loaded.forward_features(x).shape == (2, 16, 32)
