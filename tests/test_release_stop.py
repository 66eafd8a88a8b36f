"""StoP's predictor forward, against a reference written from its formula.

Reference: amirbar/StoP ``src/deit.py`` ``VisionTransformerPredictor.forward`` @ 72206b3
(configs ``configs/pretrain/vit-{b16,l16,h16}.yaml``: ``stop_params.var`` 0.25, 0.25, 0.2).
Target tokens are ``pos`` (gathered per target mask, the batch repeated per context mask) plus,
with ``apply_stop``, ``predictor_embed(noise)``, ``noise = torch.normal(0, var, (n_ctx_masks*B,
Kt, D_enc))`` drawn once per target mask in order; the mask token is never used; then
``cat([x, pred])`` per mask, the blocks, the norm, the target slice and the projection.
"""

from __future__ import annotations

import pytest
import torch

from ijepa_toolkit import load_predictor
from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch

ARCH = PredictorArch(grid=4, embed_dim=16, predictor_embed_dim=8, depth=2, num_heads=2)


def stop_reference(pred, x_enc, masks_x, masks, apply_stop, sigma, generator=None):
    """StoP's forward written from its formula, using the predictor's weights."""
    x = pred.predictor_embed(x_enc)
    n_ctx = x.shape[1]
    d = x.shape[-1]
    keep = torch.cat([m.unsqueeze(-1).repeat(1, 1, d) for m in masks_x])
    pos_all = pred.predictor_pos_embed.repeat(len(x), 1, 1)
    x = x + torch.gather(pos_all, 1, keep)
    rows = []
    for m in masks:
        pred_emb = torch.gather(pos_all, 1, m.unsqueeze(-1).repeat(len(masks_x), 1, d))
        if apply_stop:
            size = (pred_emb.shape[0], pred_emb.shape[1], x_enc.shape[-1])
            noise = torch.normal(mean=0.0, std=sigma, size=size, generator=generator)
            pred_emb = pred_emb + pred.predictor_embed(noise)
        rows.append(torch.cat([x, pred_emb], dim=1))
    x = torch.cat(rows)
    for blk in pred.predictor_blocks:
        x = blk(x)
    return pred.predictor_proj(pred.predictor_norm(x)[:, n_ctx:])


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 3, 5, 16, generator=g)  # 2 context masks, batch 3
    masks_x = [torch.randint(0, 16, (3, 5), generator=g) for _ in range(2)]
    masks = [torch.randint(0, 16, (3, 4), generator=g) for _ in range(3)]
    return x, masks_x, masks


def _predictor(**kw) -> IJEPAPredictor:
    torch.manual_seed(0)
    pred = IJEPAPredictor(ARCH, **kw).eval()
    with torch.no_grad():
        pred.predictor_embed.bias.normal_()  # a non-zero bias: zero noise still adds it
        pred.mask_token.normal_()  # never used by StoP (not a constant: LayerNorm removes those)
    return pred


@torch.no_grad()
@pytest.mark.parametrize("sigma", [0.25, 0.2])
def test_seeded_noise_reproduces_stop_exactly(inputs, sigma):
    pred = _predictor(stop_sigma=sigma)
    assert pred.settings == {"target_input": "stop_noise", "stop_sigma": sigma}
    ours = pred(*inputs, generator=torch.Generator().manual_seed(7))
    ref = stop_reference(pred, *inputs, True, sigma, torch.Generator().manual_seed(7))
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    other = pred(*inputs, generator=torch.Generator().manual_seed(8))
    assert (other - ref).abs().max() > 1e-3  # the noise matters: eval mode draws it too


@torch.no_grad()
def test_zero_noise_forward_is_stop_with_the_noise_set_to_zero(inputs):
    pred = _predictor(target_input="stop_zero_noise")
    assert pred.settings == {"target_input": "stop_zero_noise", "stop_sigma": 0.0}
    ref = stop_reference(pred, *inputs, True, 0.0)  # std 0: exactly zero noise
    assert torch.allclose(pred(*inputs), ref, atol=1e-6, rtol=0)
    assert torch.equal(pred(*inputs), pred(*inputs))
    official = _predictor()  # mask_token + pos: neither StoP forward
    assert official.settings == {"target_input": "mask_token", "stop_sigma": 0.0}
    assert (official(*inputs) - ref).abs().max() > 1e-3
    no_stop = stop_reference(pred, *inputs, False, 0.0)  # StoP without StoP: pos only
    assert (official(*inputs) - no_stop).abs().max() > 1e-3


def test_load_predictor_offers_the_modes(ckpt_path, inputs):
    pred = load_predictor(ckpt_path, num_heads=4, target_input="stop_zero_noise")
    assert pred.settings["target_input"] == "stop_zero_noise" and not pred.mask_token.requires_grad
    assert load_predictor(ckpt_path, 4, stop_sigma=0.2).settings == {
        "target_input": "stop_noise", "stop_sigma": 0.2,
    }  # fmt: skip
    with pytest.raises(ValueError, match="target_input"):
        IJEPAPredictor(ARCH, target_input="noise")
