"""Position embeddings: the sin-cos formula, and how a loaded encoder extends it to other sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from ijepa_toolkit import load_encoder
from ijepa_toolkit.models.pos_embed import DRIFT_ATOL, is_sincos, sincos_2d

D = 64  # fixture width
NATIVE = (4, 4)  # 32x32 images, patch 8


def reference_sincos(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Straightforward re-implementation, one number at a time (float64).

    Channels [0, dim/2) encode the column index, [dim/2, dim) the row index; within each half the
    first dim/4 channels are sin(pos * omega_i), the next dim/4 cos(pos * omega_i), with
    omega_i = 1 / 10000 ** (i / (dim/4)). Tokens are row-major.
    """
    quarter = dim // 4
    table = []
    for r in range(rows):
        for c in range(cols):
            vec = []
            for pos in (c, r):
                vec += [math.sin(pos / 10000 ** (i / quarter)) for i in range(quarter)]
                vec += [math.cos(pos / 10000 ** (i / quarter)) for i in range(quarter)]
            table.append(vec)
    return torch.tensor([table], dtype=torch.float64)


# --- the official code (facebookresearch/ijepa, src/models/vision_transformer.py) ---------------
def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    grid_h = np.arange(grid_size, dtype=float)
    grid_w = np.arange(grid_size, dtype=float)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0)

    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    # use half of dimensions to encode grid_h
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    emb = np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)
    return emb


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=float)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    emb_sin = np.sin(out)  # (M, D/2)
    emb_cos = np.cos(out)  # (M, D/2)
    emb = np.concatenate([emb_sin, emb_cos], axis=1)  # (M, D)
    return emb


# -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "grid"), [(64, (8, 8)), (64, (3, 5)), (64, (5, 3)), (32, (4, 4)), (16, (2, 7))]
)
def test_sincos_matches_reference(dim, grid):
    table = sincos_2d(dim, grid)
    assert table.shape == (1, grid[0] * grid[1], dim)
    assert table.dtype == torch.float32
    assert (table.double() - reference_sincos(dim, *grid)).abs().max() < 1e-6


@pytest.mark.parametrize(("dim", "side"), [(64, 4), (64, 8), (32, 4), (1280, 16)])
def test_sincos_square_matches_official_formula(dim, side):
    official = torch.from_numpy(get_2d_sincos_pos_embed(dim, side)).float().unsqueeze(0)
    assert torch.equal(sincos_2d(dim, (side, side)), official)


def test_fixture_table_is_the_official_sincos(target_encoder):
    assert target_encoder.pos_embed_kind == "sincos"
    assert is_sincos(target_encoder.pos_embed, NATIVE)
    assert not is_sincos(target_encoder.pos_embed + 2 * DRIFT_ATOL, NATIVE)
    assert not is_sincos(target_encoder.pos_embed, (2, 8))


def _manual_forward(enc, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Patch embedding + the given table, blocks, final norm: the official encoder forward."""
    tokens = enc.patch_embed(x)
    tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]) + table
    return enc.norm(enc.blocks(tokens))


@pytest.mark.parametrize(("height", "width"), [(64, 64), (32, 48), (48, 32), (16, 8)])
@torch.no_grad()
def test_loaded_encoder_recomputes_sincos_at_other_sizes(target_encoder, height, width):
    grid = (height // 8, width // 8)
    table = target_encoder.pos_embed_for_grid(grid)
    assert torch.equal(table, sincos_2d(D, grid))
    assert (table.double() - reference_sincos(D, *grid)).abs().max() < 1e-6
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    out = target_encoder.forward_features(x)
    assert out.shape == (2, grid[0] * grid[1], D)
    assert torch.allclose(out, _manual_forward(target_encoder, x, table), atol=1e-6, rtol=0)
    assert target_encoder(x).shape == (2, D)


@torch.no_grad()
def test_native_size_uses_stored_table(ckpt_path, target_encoder):
    enc = load_encoder(ckpt_path, num_heads=4)
    # the stored table is no longer the formula (not a constant shift: LayerNorm would remove it)
    enc.pos_embed.add_(torch.randn(enc.pos_embed.shape, generator=torch.Generator().manual_seed(5)))
    assert enc.pos_embed_for_grid(NATIVE) is enc.pos_embed
    small = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    big = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = enc.forward_features(small)
    assert torch.allclose(out, _manual_forward(enc, small, enc.pos_embed), atol=1e-6, rtol=0)
    assert (out - target_encoder.forward_features(small)).abs().max() > 1e-3
    # other grids are recomputed from the formula, not derived from the stored table
    assert torch.equal(enc.forward_features(big), target_encoder.forward_features(big))


@pytest.fixture
def learned_ckpt(tmp_path, target_sd):
    noise = torch.randn(target_sd["pos_embed"].shape, generator=torch.Generator().manual_seed(3))
    target_sd["pos_embed"] = target_sd["pos_embed"] + 0.02 * noise
    path = tmp_path / "learned.pth"
    torch.save(target_sd, path)
    return path


@pytest.mark.parametrize("grid", [(8, 8), (4, 6), (2, 2)])
@torch.no_grad()
def test_learned_table_is_resampled(learned_ckpt, grid):
    enc = load_encoder(learned_ckpt, num_heads=4)
    assert enc.pos_embed_kind == "learned"
    direct = resample_abs_pos_embed(
        enc.pos_embed, new_size=grid, old_size=NATIVE, num_prefix_tokens=0
    )
    table = enc.pos_embed_for_grid(grid)
    assert torch.equal(table, direct)
    assert (table - sincos_2d(D, grid)).abs().max() > 1e-3
    x = torch.randn(1, 3, grid[0] * 8, grid[1] * 8, generator=torch.Generator().manual_seed(4))
    out = enc.forward_features(x)
    assert out.shape == (1, grid[0] * grid[1], D)
    assert torch.allclose(out, _manual_forward(enc, x, direct), atol=1e-6, rtol=0)


@torch.no_grad()
def test_pos_embed_option_forces_the_kind(ckpt_path, learned_ckpt):
    forced_learned = load_encoder(ckpt_path, num_heads=4, pos_embed="learned")
    assert forced_learned.pos_embed_kind == "learned"
    expected = resample_abs_pos_embed(
        forced_learned.pos_embed, new_size=(8, 8), old_size=NATIVE, num_prefix_tokens=0
    )
    assert torch.equal(forced_learned.pos_embed_for_grid((8, 8)), expected)

    forced_sincos = load_encoder(learned_ckpt, num_heads=4, pos_embed="sincos")
    assert forced_sincos.pos_embed_kind == "sincos"
    assert torch.equal(forced_sincos.pos_embed_for_grid((8, 8)), sincos_2d(D, (8, 8)))
    # the stored (learned) table is still what is used at the native grid
    assert not is_sincos(forced_sincos.pos_embed_for_grid(NATIVE), NATIVE)

    auto = load_encoder(ckpt_path, num_heads=4, pos_embed="auto")
    assert auto.pos_embed_kind == "sincos"
    with pytest.raises(ValueError, match="pos_embed"):
        load_encoder(ckpt_path, num_heads=4, pos_embed="rope")


@pytest.mark.parametrize(("height", "width"), [(36, 32), (32, 36), (33, 33)])
def test_size_not_multiple_of_patch_is_refused(target_encoder, height, width):
    with pytest.raises(ValueError, match="patch size 8x8"):
        target_encoder.forward_features(torch.zeros(1, 3, height, width))
