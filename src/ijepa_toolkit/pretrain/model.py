"""The I-JEPA model pieces: context path (encoder + predictor), EMA target encoder, loss, init."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..errors import ConfigError
from ..models.pos_embed import sincos_2d
from ..models.predictor import IJEPAPredictor, PredictorArch, repeat_interleave_batch
from ..models.tome import TomeState
from ..models.vit import (
    MODEL_SIZES,
    EncoderArch,
    IJEPAVisionTransformer,
    Masks,
    apply_masks,
    create_encoder,
    encode_masked,
)
from ..models.vit_variants import create_variant_encoder
from .packing import PAD, PackedBatch, _positions, _sample_mask, encode_packed, predict_batch
from .sections import ModelSection
from .token_drop import TokenDrop, select_context

LOSSES = ("smooth_l1", "l2")


def encoder_arch(section: ModelSection, img_size: int) -> EncoderArch:
    """The encoder shape: ``model_name`` at ``img_size``/``patch_size``, ``arch`` overrides."""
    width, depth, heads, mlp_ratio = MODEL_SIZES[section.model_name]
    fields = dict(
        img_size=img_size, patch_size=section.patch_size, embed_dim=width, depth=depth,
        num_heads=heads, mlp_ratio=mlp_ratio, norm=section.output_norm,
        block_norm=section.block_norm, norm_affine=section.norm_affine,
        norm_out_affine=section.norm_out_affine, qkv_bias=section.qkv_bias,
    )  # fmt: skip
    fields.update(section.arch or {})
    try:
        arch = EncoderArch(**fields)
    except TypeError as e:
        raise ValueError(f"model.arch: {e}") from None
    if img_size % arch.patch_size:
        raise ValueError(f"data.crop_size={img_size} is not a multiple of patch {arch.patch_size}")
    return arch


def official_init_(module: nn.Module, blocks: nn.ModuleList, std: float = 0.02) -> None:
    """The official I-JEPA init: trunc-normal(0.02) Linear/Conv weights, zero biases, unit
    LayerNorms, then each block's ``attn.proj`` and ``mlp.fc2`` weights divided by
    ``sqrt(2 * layer)`` (layers counted from 1). Other norms (DynTanh) keep their own init."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            for mlp in getattr(block.mlp, "experts", [block.mlp]):  # DiffMoE: every expert
                mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


class ContextPath(nn.Module):
    """Context encoder + predictor in one module (one DDP wrapper, the trained parameters).

    ``forward(images, masks_enc, masks_pred)``: (B, C, H, W) images -> predictions
    (len(masks_pred) * len(masks_enc) * B, Kt, D), mask-major as the official code. With a
    ``TokenDrop`` the predictor sees its subsets of R copies: (Mp * Me * R * B, kt, D).
    ``forward(packed_batch)``: predictions (C*R, kt, D) at the target tokens of the batch's
    predictor copies (``packing.predictor_view``; C=1, kt=Lt without copies).
    ``forward(packed_batch, merged=MergedTargets)``: ToMe without unmerging (IJEPA-Enhanced
    ``should_unmerge: false``): predictions (C*R, L', D) at the merged target-encoder tokens.
    ``encoder_registers``: the context encoder's registers enter the predictor (featurenorm).
    """

    def __init__(
        self, encoder: IJEPAVisionTransformer, predictor: IJEPAPredictor, tome_rates=(),
        tome_placement: str = "attention", tome_mode: str = "mean", encoder_registers: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.encoder_registers = encoder_registers
        self.tome_rates = tuple(tome_rates)  # ToMe in the packed encoder (packing.py)
        self.tome_options = {"tome_placement": tome_placement, "tome_mode": tome_mode}

    def forward(
        self, images: torch.Tensor | PackedBatch, masks_enc: Optional[Masks] = None,
        masks_pred: Optional[Masks] = None, drop: Optional[TokenDrop] = None,
        merged: Optional[MergedTargets] = None,
    ) -> torch.Tensor:  # fmt: skip
        if merged is not None:
            return self._predict_merged(images, merged)
        if isinstance(images, PackedBatch):
            b = images
            ctx = encode_packed(
                self.encoder, b.ctx_px, b.ctx_ids, b.ctx_gsample, b.grids, self.tome_rates,
                **self.tome_options,
            )  # fmt: skip
            return predict_batch(self.predictor, ctx, b)
        if not self.encoder_registers:
            ctx, regs = encode_masked(self.encoder, images, masks_enc), None
        else:
            ctx, regs = self.encoder.encode_masked_registers(images, masks_enc)
        if drop is None:
            return self.predictor(ctx, masks_enc, masks_pred, registers=regs)
        if regs is not None:  # every copy keeps the registers of its image
            regs = torch.cat([r.repeat(drop.repeats, 1, 1) for r in regs.chunk(len(drop.ctx_keep))])
        return self.predictor(
            select_context(ctx, drop), drop.masks_enc, drop.masks_pred, registers=regs
        )

    def _predict_merged(self, b: PackedBatch, merged: MergedTargets) -> torch.Tensor:
        """Merged context tokens + mask tokens at the merged targets -> (C*R, L', D)."""
        ctx, state = encode_packed(
            self.encoder, b.ctx_px, b.ctx_ids, b.ctx_gsample, b.grids, self.tome_rates,
            tome_unmerge=False, **self.tome_options,
        )  # fmt: skip
        p, c = self.predictor, merged.copies
        pos = state.merge_all(predictor_positions(p, b.ctx_ids, b.ctx_gsample, b.grids))
        x = p.predictor_embed(ctx) + pos.to(ctx.dtype)
        t = p.mask_token.to(x.dtype) + merged.positions.to(x.dtype)
        x = torch.cat([x, t], dim=1).repeat(c, 1, 1)
        tgt_ids = merged.ids.repeat(c, 1).masked_fill(~merged.is_target, PAD)
        ids = torch.cat([state.ids.repeat(c, 1), tgt_ids], dim=1)
        x = p.blocks_forward(x, ids, _sample_mask)
        return p.predictor_proj(x[:, ctx.shape[1] :])


@dataclass
class MergedTargets:
    """The target encoder's merged packed rows (ToMe without unmerging): ``ids`` (R, L')
    merged sample ids, ``positions`` (R, L', Dp) the mean predictor position of each merged
    token, ``is_target`` (C*R, L') the merged tokens each predictor copy predicts (any of
    their tokens is a target of the copy)."""

    ids: torch.Tensor
    positions: torch.Tensor
    is_target: torch.Tensor
    copies: int


def predictor_positions(predictor: IJEPAPredictor, ids, gsample, grids) -> torch.Tensor:
    """(R, L, Dp) the predictor's sin-cos positions of packed tokens at each image's grid."""
    width = predictor.predictor_embed.out_features
    device = predictor.predictor_embed.weight.device
    return _positions([sincos_2d(width, g).to(device)[0] for g in grids], gsample, ids, grids)


def merged_packed_loss(
    model: nn.Module, target_encoder: nn.Module, target_norm: nn.Module, batch: PackedBatch,
    section: ModelSection,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """IJEPA-Enhanced ``compute_loss`` with ``should_unmerge: false`` (``ijepa_enhanced/
    train.py`` @ 03b6a50): the target encoder's merged (R, L', D) tokens are the targets, a
    merged token is a target of a predictor copy when any of its tokens is; the predictor sees
    the merged context and mask tokens at the merged tokens' mean positions; the loss is over
    the merged targets. ``model`` is the ``ContextPath`` (or its DDP wrapper). Returns (loss,
    merged target-encoder tokens (R, L', D), their (R, L') image index)."""
    with torch.no_grad():
        ids = torch.cat([batch.ctx_ids, batch.tgt_ids], dim=1)
        gsample = torch.cat([batch.ctx_gsample, batch.tgt_gsample], dim=1)
        tokens, state = encode_packed(
            target_encoder, torch.cat([batch.ctx_px, batch.tgt_px], dim=1), ids, gsample,
            batch.grids, section.target_rates(), section.tome_placement, section.tome_mode,
            tome_unmerge=False,
        )  # fmt: skip
        is_target = _merged_targets(state, batch)
        c = len(is_target) // len(tokens)
        target = target_norm(tokens, is_target[: len(tokens)]).repeat(c, 1, 1)
        predictor = getattr(model, "module", model).predictor
        positions = state.merge_all(predictor_positions(predictor, ids, gsample, batch.grids))
    pred = model(batch, merged=MergedTargets(state.ids, positions, is_target, c))
    loss = prediction_loss(pred[is_target], target[is_target].to(pred.dtype), section.loss)
    return loss, tokens, state.merge_all(gsample).round().long()


def _merged_targets(state: TomeState, batch: PackedBatch) -> torch.Tensor:
    """(C*R, L') bool: merged tokens holding a target token of predictor copy j (row j*R + r)."""
    view = batch.view
    valid = batch.tgt_gsample != PAD
    if view is not None and (view.ctx_index is not None or view.tgt_index is not None):
        raise ConfigError("model.tome_unmerge=false works without predictor token dropping")
    copies = valid[None] if view is None else view.tgt_valid.reshape(view.copies, *valid.shape)
    ctx = torch.zeros_like(batch.ctx_gsample, dtype=torch.float32)
    return torch.cat([state.merge_all(torch.cat([ctx, t.float()], 1)) > 0 for t in copies])


def build_encoder(section: ModelSection, img_size: int) -> IJEPAVisionTransformer:
    """A fresh encoder of ``section`` at ``img_size`` with the official init: the official
    ``IJEPAVisionTransformer`` unless a ``VariantViT`` option is set (positions other than
    sin-cos, registers, DiffMoE, q/k norm, tanh GELU)."""
    arch = encoder_arch(section, img_size)
    plain = section.pos_embed == "sincos" and section.mlp_act == "gelu" and not (
        section.num_registers or section.moe_experts or section.qk_norm
    )  # fmt: skip
    if plain:
        encoder = create_encoder(arch, pos_embed_kind="sincos", drop_path_rate=section.drop_path)
    else:
        encoder = create_variant_encoder(
            arch, section.pos_embed, section.num_registers, section.rope_theta, section.drop_path,
            section.moe_experts, section.moe_capacity, section.moe_threshold, section.mlp_act,
            section.qk_norm,
        )  # fmt: skip
    official_init_(encoder, encoder.blocks)
    return encoder


def build_models(
    section: ModelSection, img_size: int
) -> tuple[IJEPAVisionTransformer, IJEPAPredictor, IJEPAVisionTransformer]:
    """Fresh ``(encoder, predictor, target_encoder)`` with the official init; the target
    encoder is a frozen copy of the encoder and the sin-cos position tables are not trained."""
    encoder = build_encoder(section, img_size)
    arch = encoder.arch
    if section.pos_embed == "sincos":
        encoder.pos_embed.requires_grad_(False)
    pred_arch = PredictorArch(
        grid=img_size // arch.patch_size, embed_dim=arch.embed_dim,
        predictor_embed_dim=section.pred_emb_dim, depth=section.pred_depth,
        num_heads=section.pred_num_heads or arch.num_heads,
        num_registers=section.pred_num_registers, block_norm=section.pred_block_norm,
        norm_affine=section.pred_norm_affine, qk_norm=section.pred_qk_norm,
        qkv_bias=section.pred_qkv_bias, proj_bias=section.pred_proj_bias,
        mlp_act=section.pred_mlp_act, layernorm_eps=section.pred_layernorm_eps,
    )  # fmt: skip
    stop_sigma = section.stop_sigma if section.stop else 0.0
    predictor = IJEPAPredictor(
        pred_arch, drop_path_rate=section.drop_path, stop_sigma=stop_sigma,
        tome_rates=section.pred_tome_rates, tome_mode=section.pred_tome_mode,
        zero_encoder_registers=section.pred_zero_encoder_registers,
    )  # fmt: skip
    official_init_(predictor, predictor.predictor_blocks)
    target_encoder = copy.deepcopy(encoder)
    for p in target_encoder.parameters():
        p.requires_grad_(False)
    return encoder, predictor, target_encoder


def targets_at(tokens: torch.Tensor, masks_pred: Masks, num_enc_masks: int) -> torch.Tensor:
    """Target tokens (B, N, D) at the target positions, laid out as the predictions:
    (len(masks_pred) * num_enc_masks * B, Kt, D)."""
    h = apply_masks(tokens, masks_pred)
    return repeat_interleave_batch(h, tokens.shape[0], repeat=num_enc_masks)


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1"):
    """Mean smooth-L1 (beta 1, official) or mean squared error between (M, K, D) tensors."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``t = momentum * t + (1 - momentum) * s`` for every parameter pair, bitwise the official
    ``t.mul_(m).add_((1 - m) * s)``: the product ``(1 - m) * s`` is rounded before the add (an
    ``add_(s, alpha=1 - m)`` fuses the two and can differ in the last bit). On CUDA one
    ``foreach`` call per operation (few kernel launches); on the CPU a tensor at a time, as the
    official loop: the foreach products of every parameter at once are a fresh buffer that page
    faults each step (24 vs 11 ms for a ViT-Ti)."""
    t_params = list(target.parameters())
    s_params = [p.detach() for p in source.parameters()]
    if t_params and t_params[0].is_cuda:
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, torch._foreach_mul(s_params, 1.0 - momentum))
        return
    for t, s in zip(t_params, s_params):
        t.mul_(momentum).add_(s * (1.0 - momentum))
