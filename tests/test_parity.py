"""The loaded encoders and predictor compute what the official I-JEPA code computes."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ijepa_toolkit import encode_masked, load_encoder, load_predictor

ATOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def test_target_encoder_tokens_and_pooled(target_encoder, images, expected):
    assert (
        max_diff(target_encoder.forward_features(images), expected["target_encoder_tokens"]) < ATOL
    )
    assert max_diff(target_encoder(images), expected["target_encoder_avgpool"]) < ATOL


@torch.no_grad()
def test_context_encoder_tokens(context_encoder, images, expected):
    assert max_diff(context_encoder.forward_features(images), expected["encoder_tokens"]) < ATOL


@torch.no_grad()
def test_predictor_output(ckpt_path, context_encoder, images, expected):
    predictor = load_predictor(ckpt_path, num_heads=4)
    assert not predictor.training
    ctx = expected["predictor_context_idx"]
    targets = [expected["predictor_target_idx_0"], expected["predictor_target_idx_1"]]
    out = predictor(encode_masked(context_encoder, images, ctx), ctx, targets)
    assert max_diff(out, expected["predictor_output"]) < ATOL


@torch.no_grad()
def test_default_which_is_target_encoder(ckpt_path, context_encoder, images, expected):
    default = load_encoder(ckpt_path, num_heads=4)
    tokens = default.forward_features(images)
    assert max_diff(tokens, expected["target_encoder_tokens"]) < ATOL
    # the two encoders differ in the fixture, so a wrong default would be visible
    assert max_diff(tokens, context_encoder.forward_features(images)) > 1e-2


def test_returns_timm_vit_in_eval_mode(target_encoder):
    assert isinstance(target_encoder, VisionTransformer)
    assert not target_encoder.training
    assert all(not m.training for m in target_encoder.modules())
    assert target_encoder.num_prefix_tokens == 0
    assert target_encoder.cls_token is None
    assert target_encoder.global_pool == "avg"


def test_log_line_names_what_was_loaded(ckpt_path, caplog):
    caplog.set_level(logging.INFO, logger="ijepa_toolkit")
    load_encoder(ckpt_path, which="encoder", num_heads=4)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ijepa_toolkit")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("loaded encoder from ")
    assert str(ckpt_path) in line
    for part in ("format=ijepa", "depth=4", "width=64", "heads=4", "patch=8", "epoch=300"):
        assert part in line, (part, line)


@torch.no_grad()
def test_encode_masked_list_equals_concatenation(context_encoder, images, expected):
    m0, m1 = expected["predictor_target_idx_0"], expected["predictor_target_idx_1"]
    m1 = torch.stack([m1[0], m0[1]])  # different masks per image too
    both = encode_masked(context_encoder, images, [m0, m1])
    single = torch.cat(
        [encode_masked(context_encoder, images, m0), encode_masked(context_encoder, images, m1)]
    )
    assert both.shape == (4, 2, 64)
    assert torch.equal(both, single)


@torch.no_grad()
def test_encode_masked_with_all_patches_is_forward_features(context_encoder, images):
    everything = torch.arange(16).expand(2, 16)
    full = context_encoder.forward_features(images)
    assert max_diff(encode_masked(context_encoder, images, everything), full) < 1e-6
    # a mask that keeps a subset is not just a slice of the full output (attention sees less)
    ctx = torch.arange(12).expand(2, 12)
    assert max_diff(encode_masked(context_encoder, images, ctx), full[:, :12]) > 1e-3


def test_predictor_needs_heads_for_nonstandard_width(ckpt_path):
    with pytest.raises(ValueError, match="num_heads"):
        load_predictor(ckpt_path)
