"""Sample packing: every image once, exact round trip, attention isolation, padding out of loss."""

from __future__ import annotations

import pytest
import torch

from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch
from ijepa_toolkit.models.vit import EncoderArch, create_encoder
from ijepa_toolkit.models.vit_variants import create_variant_encoder
from ijepa_toolkit.pretrain.packing import (
    PAD,
    PackingSection,
    PackingStream,
    encode_packed,
    first_fit,
    pack,
    packed_loss,
    patchify,
    predict_packed,
    resized_shape,
    same_image_mask,
)

SECTION = PackingSection(enabled=True, min_side=8, max_side=24, ctx_budget=48, tgt_budget=12)


def _images(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    sizes = [(16, 16), (12, 20), (24, 8), (20, 14)]
    return [torch.rand(3, *sizes[i % 4], generator=g) for i in range(n)]


def test_first_fit_places_every_item_exactly_once():
    g = torch.Generator().manual_seed(1)
    lengths = [(int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 9, (1,),
               generator=g))) for _ in range(200)]  # fmt: skip
    rows = first_fit(lengths, 48, 12)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(200))  # no item dropped, none duplicated
    for row in rows:
        assert sum(lengths[i][0] for i in row) <= 48 and sum(lengths[i][1] for i in row) <= 12
    # the item that overflows a row opens a new one; the last item is never lost
    assert first_fit([(40, 2), (40, 2), (5, 11), (1, 1)], 48, 12) == [[0, 3], [1], [2]]
    with pytest.raises(ValueError, match="row budgets"):
        first_fit([(49, 1)], 48, 12)


def test_pack_round_trip_reconstructs_each_resized_image():
    images = _images(12)
    batch = pack(images, 4, SECTION, torch.Generator().manual_seed(0))
    assert sorted(i for row in batch.rows for i in row) == list(range(12))
    for i, (gh, gw) in enumerate(batch.grids):
        assert gh * 4 <= 24 and gw * 4 <= 24 and max(gh, gw) * 4 >= 8
        tokens = {}
        for part in ("ctx", "tgt"):
            gs, ids, px = (getattr(batch, f"{part}_{k}") for k in ("gsample", "ids", "px"))
            for r, t in (gs == i).nonzero().tolist():
                key = (int(ids[r, t, 2]), int(ids[r, t, 3]))
                assert key not in tokens  # each patch once, in context or target
                tokens[key] = px[r, t]
        assert len(tokens) == gh * gw
        resized = torch.nn.functional.interpolate(
            images[i][None], size=(gh * 4, gw * 4), mode="bilinear", antialias=True
        )[0]
        expected = patchify(resized, 4)
        for (row, col), value in tokens.items():
            assert torch.allclose(value, expected[row * gw + col])
    assert 0 <= batch.padding_rate < 1
    assert resized_shape(30, 60, 24, 8) == (16, 24)  # aspect kept, whole 2x2 windows of 4 px


@pytest.mark.parametrize("pos_kind", ["sincos", "rope"])
def test_attention_isolation_between_images_in_one_row(pos_kind):
    torch.manual_seed(0)
    arch = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    enc = create_variant_encoder(arch, pos_kind) if pos_kind == "rope" else create_encoder(arch)
    images = _images(6)
    batch = pack(images, 4, SECTION, torch.Generator().manual_seed(3))
    row = max(range(len(batch.rows)), key=lambda r: len(batch.rows[r]))
    assert len(batch.rows[row]) >= 2
    args = (batch.ctx_ids, batch.ctx_gsample, batch.grids)
    with torch.no_grad():
        out = encode_packed(enc.eval(), batch.ctx_px, *args)
        changed = batch.ctx_px.clone()
        first = batch.rows[row][0]
        changed[batch.ctx_gsample == first] += 5.0  # alter one image
        changed[batch.ctx_gsample == PAD] = 7.0  # and the padding
        out2 = encode_packed(enc, changed, *args)
        # a packed image computes the same tokens as the same image alone in its own row
        alone = batch.ctx_gsample == batch.rows[row][1]
        solo_px = torch.zeros_like(batch.ctx_px[:1])
        solo_ids = torch.full_like(batch.ctx_ids[:1], PAD)
        solo_gs = torch.full_like(batch.ctx_gsample[:1], PAD)
        n = int(alone.sum())
        solo_px[0, :n], solo_ids[0, :n], solo_gs[0, :n] = (
            batch.ctx_px[alone],
            batch.ctx_ids[alone],
            batch.ctx_gsample[alone],
        )
        solo_ids[0, :n, 0] = 0
        solo = encode_packed(enc, solo_px, solo_ids, solo_gs, batch.grids)
    others = (batch.ctx_gsample != first) & (batch.ctx_gsample != PAD)
    assert torch.allclose(out[others], out2[others], atol=1e-5)
    assert not torch.allclose(out[batch.ctx_gsample == first], out2[batch.ctx_gsample == first])
    assert torch.allclose(solo[0, :n], out[alone], atol=1e-5)


def test_predictor_and_loss_ignore_padding():
    torch.manual_seed(0)
    arch = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    enc = create_encoder(arch).eval()
    pred = IJEPAPredictor(PredictorArch(grid=4, embed_dim=32, predictor_embed_dim=16, depth=1,
                                        num_heads=2)).eval()  # fmt: skip
    batch = pack(_images(5), 4, SECTION, torch.Generator().manual_seed(4))
    with torch.no_grad():
        ctx = encode_packed(enc, batch.ctx_px, batch.ctx_ids, batch.ctx_gsample, batch.grids)
        z = predict_packed(pred, ctx, batch.ctx_ids, batch.ctx_gsample, batch.tgt_ids,
                           batch.tgt_gsample, batch.grids)  # fmt: skip
        ctx2 = ctx.clone()
        ctx2[batch.ctx_gsample == PAD] = 100.0
        z2 = predict_packed(pred, ctx2, batch.ctx_ids, batch.ctx_gsample, batch.tgt_ids,
                            batch.tgt_gsample, batch.grids)  # fmt: skip
    valid = batch.tgt_gsample != PAD
    assert z.shape == (len(batch.rows), 12, 32)
    assert torch.allclose(z[valid], z2[valid], atol=1e-5)
    target = torch.randn_like(z)
    loss = packed_loss(z, target, batch.tgt_gsample, "l2")
    target2 = target.clone()
    target2[~valid] = 1e3
    assert loss == packed_loss(z, target2, batch.tgt_gsample, "l2")
    assert torch.isclose(loss, ((z[valid] - target[valid]) ** 2).mean())


def test_stream_emits_every_image_exactly_once_and_pads_less():
    section = PackingSection(enabled=True, min_side=16, max_side=32, ctx_budget=256,
                             tgt_budget=64)  # fmt: skip
    stream = PackingStream(4, section)
    emitted, rates = [], []
    for step in range(6):
        keys = list(range(step * 40, step * 40 + 40))
        batch, order = stream(_images(40, seed=step), keys, torch.Generator().manual_seed(step))
        emitted += [order[i] for row in batch.rows for i in row]
        rates.append(batch.padding_rate)
        assert (batch.ctx_ids[..., 1] == 0).all()  # register flag: no registers packed
        assert same_image_mask(batch.ctx_ids).shape[-1] == 256
    waiting = [k for k, _ in stream.waiting]
    assert sorted(emitted + waiting) == list(range(240))  # none dropped, none twice
    assert sum(rates) / len(rates) < 0.08
