"""Factorised row + column positions at other grids, against the seeds' own lookups.

Fixture ``tests/fixtures/featurenorm/positions.safetensors`` (README there): fixed tables
``h_table`` (10, 8) / ``w_table`` (12, 8), looked up at 4x6, 8x3 and 10x12 by
theAdamColton/elucidating-featurenorm-ijepa ``src/model.py`` ``Encoder.forward``
(``h_emb[row] + w_emb[col]``, commit eb093c217f3b475981c84332245530fd17bc30c3) and by
theAdamColton/ijepa-enhanced ``ijepa_enhanced/vit.py`` ``IndependentPositionEmbedding``
(commit 03b6a50ff4cde68be66874f7387ff6cdc8615787): both index the tables by absolute patch row /
column, so a smaller grid uses the tables' first rows / columns.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ijepa_toolkit.errors import UserError
from ijepa_toolkit.models.vit import EncoderArch
from ijepa_toolkit.models.vit_variants import create_variant_encoder, factorized_positions

FIXTURE = load_file(Path(__file__).parent / "fixtures" / "featurenorm" / "positions.safetensors")
GRIDS = [(4, 6), (8, 3), (10, 12)]


@pytest.mark.parametrize("seed", ["featurenorm", "enhanced"])
@pytest.mark.parametrize("grid", GRIDS)
def test_factorised_lookup_is_the_seeds_absolute_index(seed, grid):
    h, w = grid
    rows, cols = FIXTURE["h_table"][None], FIXTURE["w_table"][None]
    got = factorized_positions(rows, cols, h, w)[0]
    assert torch.allclose(got, FIXTURE[f"{seed}_{h}x{w}"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_encoder_positions_at_smaller_grids_and_a_clear_error_beyond_the_tables():
    arch = EncoderArch(img_size=48, patch_size=4, embed_dim=8, depth=1, num_heads=1)
    enc = create_variant_encoder(arch, "factorized")  # 12 x 12 tables
    enc.pos_embed_row[0, :10] = FIXTURE["h_table"]
    enc.pos_embed_col[0] = FIXTURE["w_table"]
    for h, w in GRIDS:
        expected = FIXTURE[f"featurenorm_{h}x{w}"]
        assert torch.allclose(enc.pos_embed_for_grid((h, w))[0], expected, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match=r"13x12 patch grid .*12 rows x 12 columns"):
        enc.forward_features(torch.zeros(1, 3, 52, 48))
