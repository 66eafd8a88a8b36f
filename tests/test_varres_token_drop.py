"""Predictor token dropping with batch repeat: fractions, disjointness, the plain-step limit,
and the featurenorm seed's own draws (tests/fixtures/featurenorm)."""

from __future__ import annotations

import pytest
import torch
from _featurenorm import FIXTURES, load
from safetensors.torch import load_file

from ijepa_toolkit.errors import ConfigError
from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch
from ijepa_toolkit.models.vit import EncoderArch, create_encoder
from ijepa_toolkit.pretrain.model import ContextPath, targets_at
from ijepa_toolkit.pretrain.token_drop import (
    kept_count,
    sample_token_drop,
    sample_units,
    select_context,
)


def _masks(b: int, k: int, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])


@pytest.mark.parametrize("replacement", [False, True])
def test_fractions_and_repeat_layout(replacement):
    b, r, cap = 3, 4, 0.25
    enc, pred = [_masks(b, 40)], [_masks(b, 12, seed=1), _masks(b, 8, seed=2)]
    drop = sample_token_drop(enc, pred, cap, r, replacement)
    assert drop.masks_enc[0].shape == (r * b, 10) and drop.ctx_keep[0].shape == (r * b, 10)
    assert [m.shape for m in drop.masks_pred] == [(r * b, 3), (r * b, 2)]
    for j in range(r):  # copy j of image i is row j*B + i and holds only that image's patches
        for i in range(b):
            row = drop.masks_enc[0][j * b + i]
            assert set(row.tolist()) <= set(enc[0][i].tolist()) and len(set(row.tolist())) == 10
    if not replacement:  # 4 copies x 25 %: every context token of an image exactly once
        for i in range(b):
            seen = torch.cat([drop.masks_enc[0][j * b + i] for j in range(r)])
            assert sorted(seen.tolist()) == enc[0][i].tolist()


def test_replacement_draws_overlap_sometimes():
    enc = [_masks(8, 40)]
    drop = sample_token_drop(enc, [_masks(8, 12)], 0.5, 2, replacement=True)
    first, second = drop.masks_enc[0][:8], drop.masks_enc[0][8:]
    overlaps = [len(set(a.tolist()) & set(c.tolist())) for a, c in zip(first, second)]
    assert max(overlaps) > 0  # disjoint draws would always give 0


def test_too_many_disjoint_copies_is_an_error():
    with pytest.raises(ValueError, match="pred_capacity"):
        sample_token_drop([_masks(2, 10)], [_masks(2, 4)], 0.5, 3, replacement=False)


def test_select_context_gathers_the_kept_tokens():
    b, r = 2, 2
    enc = [_masks(b, 16), _masks(b, 16, seed=3)]
    ctx = torch.randn(2 * b, 16, 8)  # mask-major encoder output
    drop = sample_token_drop(enc, [_masks(b, 8)], 0.5, r, replacement=False)
    out = select_context(ctx, drop)
    assert out.shape == (2 * r * b, 8, 8)
    m, j, i = 1, 1, 0  # mask 1, copy 1, image 0
    row = m * r * b + j * b + i
    assert torch.equal(out[row], ctx[m * b + i, drop.ctx_keep[m][j * b + i]])


def test_full_capacity_single_copy_is_the_plain_step():
    torch.manual_seed(0)
    arch = EncoderArch(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    pred = IJEPAPredictor(PredictorArch(grid=8, embed_dim=32, predictor_embed_dim=16, depth=1,
                                        num_heads=2))  # fmt: skip
    path = ContextPath(create_encoder(arch), pred).eval()
    images, enc, tgt = torch.randn(2, 3, 32, 32), [_masks(2, 30)], [_masks(2, 9, seed=5)]
    drop = sample_token_drop(enc, tgt, 1.0, 1, replacement=False)
    tokens = torch.randn(2, 64, 32)
    with torch.no_grad():
        assert torch.allclose(path(images, enc, tgt, drop), path(images, enc, tgt), atol=1e-6)
    assert torch.equal(targets_at(tokens, drop.masks_pred, 1), targets_at(tokens, tgt, 1))


def _sets(idx: torch.Tensor) -> list:
    return [sorted(row.tolist()) for row in idx]


@pytest.mark.parametrize(
    "key, seed, repeats, capacity, replacement, masked",
    [("with_11", 11, 4, 0.25, True, True), ("with_12", 12, 4, 0.25, True, True),
     ("with_c035", 13, 3, 0.35, True, False), ("without_14", 14, 2, 0.5, False, True)],
)  # fmt: skip
def test_draws_equal_featurenorm_random_idx(key, seed, repeats, capacity, replacement, masked):
    """Same random stream, same windows: ``get_random_idx_with_replacement`` (top-k of
    ``torch.rand(r, b, s)``, all-padding windows scored -1, ``round`` count: 0.35 x 10 -> 4) and
    ``get_random_idx_without_replacement`` of src/model.py
    (theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3),
    compared as sets per row (the seed's top-k is unsorted)."""
    f = load("token_drop")
    g = torch.Generator().manual_seed(seed)
    exclude = f["mask"] if masked else None
    got = sample_units(2, 10, capacity, repeats, replacement, g, exclude)
    assert _sets(got) == _sets(f[key])


def test_count_rounds_and_windows_are_the_units():
    assert [kept_count(10, c) for c in (0.35, 0.25, 0.05, 0.66)] == [4, 2, 1, 7]
    grid_w = 4  # a 4x4 grid; the context is the top two 2x2 windows plus the bottom-left one
    ctx = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13]])
    drop = sample_token_drop([ctx], [torch.tensor([[10, 11, 14, 15]])], 0.34, 3, window=2,
                             grid_w=grid_w, generator=torch.Generator().manual_seed(0))  # fmt: skip
    windows = {(0, 1, 4, 5), (2, 3, 6, 7), (8, 9, 12, 13)}
    for row in drop.masks_enc[0]:  # one whole window (round(0.34 * 3) = 1) per copy
        assert tuple(row.tolist()) in windows
    assert drop.masks_pred[0].tolist() == [[10, 11, 14, 15]] * 3
    with pytest.raises(ConfigError, match="pred_window=2"):
        sample_token_drop([torch.tensor([[0, 1, 2, 3]])], [ctx], 0.5, 1, window=2, grid_w=4)


def _packed_rows(sample_ids: torch.Tensor, ctx_len: int):
    """A PackedBatch whose token ids are the fixture's seed rows (slot i at (i // 8, i % 8))."""
    from ijepa_toolkit.pretrain.packing import PAD, PackedBatch

    rows, length = sample_ids.shape
    sample = sample_ids.masked_fill(sample_ids == -100, PAD)
    slot = torch.arange(length).expand(rows, -1)
    ids = torch.stack([sample, torch.zeros_like(sample), slot // 8, slot % 8], -1)
    gsample = torch.where(sample == PAD, PAD, sample + 2 * torch.arange(rows)[:, None])
    px = torch.zeros(rows, length, 3)
    part = lambda t: (t[:, :ctx_len], t[:, ctx_len:])  # noqa: E731
    (cp, tp), (ci, ti), (cg, tg) = part(px), part(ids), part(gsample)
    return PackedBatch(cp, ci, cg, tp, ti, tg, grids=[(5, 8)] * (2 * rows), rows=[])


@pytest.mark.parametrize("seed", [21, 22])
def test_packed_rows_drop_the_seed_windows(seed):
    """Packed rows, 0.25 x 4 copies with replacement in 2x2 windows: the tokens the predictor
    of featurenorm's ``IJEPAModel.forward`` (src/model.py,
    theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3)
    received, captured by a forward pre-hook, are the ones ``predictor_view`` keeps from the same
    random stream (windows = consecutive 4-token groups of the row, all-padding windows drawn
    last; ``round(0.25 * 6) = 2`` target windows), and the loss counts the same tokens."""
    from ijepa_toolkit.pretrain.packing import predictor_view

    f = load_file(FIXTURES.parent / "featurenorm_packing" / "packed_drop.safetensors")
    ctx_len = int(f["ctx_len"])
    batch = _packed_rows(f["sample_ids"], ctx_len)
    gen = torch.Generator().manual_seed(seed)
    torch.randn(3, 40, 12, generator=gen)  # the fixture's input patches, drawn first
    view = predictor_view(batch, 0.25, 4, True, 2, gen)
    seed_ids = f[f"pred_ids_{seed}"]
    slots = seed_ids[..., 2] * 8 + seed_ids[..., 3]
    kc = view.ctx_index.shape[1]
    assert _sets(view.ctx_index) == _sets(slots[:, :kc])
    assert _sets(view.tgt_index) == _sets(slots[:, kc:] - ctx_len)
    assert view.tgt_valid.sum(1).tolist() == f[f"is_target_{seed}"].sum(1).tolist()
