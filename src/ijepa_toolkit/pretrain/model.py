"""The I-JEPA model pieces: context path (encoder + predictor), EMA target encoder, loss, init."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..models.predictor import IJEPAPredictor, PredictorArch, repeat_interleave_batch
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
from .packing import PackedBatch, encode_packed, predict_packed
from .token_drop import TokenDrop, select_context

LOSSES = ("smooth_l1", "l2")


@dataclass
class ModelSection:
    """Encoder, predictor and the StoP / feature-normalisation switches."""

    model_name: Literal[
        "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"
    ] = "vit_huge"
    patch_size: int = 14
    arch: Optional[dict] = None  # EncoderArch fields overriding the named size (tiny tests)
    pred_depth: int = 12
    pred_emb_dim: int = 384
    drop_path: float = 0.0
    output_norm: Literal["layernorm", "dyntanh"] = "layernorm"  # the encoder's final norm
    block_norm: Literal["layernorm", "dyntanh"] = "layernorm"  # norm1/norm2 inside the blocks
    norm_affine: bool = True  # DynTanh weight/bias
    target_norm: Literal[
        "layernorm", "batchnorm", "running_batchnorm", "running_batchnorm_singleton", "none"
    ] = "layernorm"  # pretrain/targets.py
    stop: bool = False  # StoP: stochastic positions for the predictor's target tokens
    stop_sigma: float = 0.25  # std of the StoP noise, in the encoder width
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    # variable-resolution options (models/vit_variants.py), off by default
    pos_embed: Literal["sincos", "learned", "factorized", "rope"] = "sincos"
    rope_theta: float = 10000.0
    num_registers: int = 0  # encoder register tokens (not targets, not pooled)
    pred_num_registers: int = 0  # predictor register tokens (never predictions, never in the loss)
    # predictor token dropping + batch repeat (token_drop.py); 1.0 / 1 = off
    pred_capacity: float = 1.0  # fraction of context and of target tokens per predictor copy
    pred_repeats: int = 1  # predictor copies per image
    pred_replacement: bool = True  # copies draw independently (seed), else disjoint subsets
    pred_window: int = 1  # token-drop units: window x window patches (featurenorm: 2)
    tome_rates: list = field(default_factory=list)  # ToMe: tokens merged per encoder block
    # ToMe merge point: after the attention (ijepa-enhanced) or after the whole block (featurenorm)
    tome_placement: Literal["attention", "block"] = "attention"
    tome_mode: Literal["mean", "drop"] = "mean"  # merged tokens: unweighted mean, or dropped
    moe_experts: int = 0  # DiffMoE MLPs in the encoder (0: dense MLP)
    moe_capacity: float = 1.0  # training: each expert takes capacity * tokens / experts tokens
    moe_threshold: float = 0.5  # eval: capacity-predictor probability to use an expert
    moe_aux_weight: float = 1.0  # weight of the capacity predictor's BCE in the loss

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        cap, rep = self.pred_capacity, self.pred_repeats
        disjoint_ok = self.pred_replacement or cap * rep <= 1 + 1e-9
        return [
            ("patch_size", self.patch_size, self.patch_size >= 1, ">= 1"),
            ("pred_depth", self.pred_depth, self.pred_depth >= 1, ">= 1"),
            ("pred_emb_dim", self.pred_emb_dim, self.pred_emb_dim >= 1, ">= 1"),
            ("drop_path", self.drop_path, 0 <= self.drop_path < 1, "in [0, 1)"),
            ("stop_sigma", self.stop_sigma, self.stop_sigma >= 0, ">= 0"),
            ("rope_theta", self.rope_theta, self.rope_theta > 0, "> 0"),
            ("num_registers", self.num_registers, self.num_registers >= 0, ">= 0"),
            ("pred_num_registers", self.pred_num_registers, self.pred_num_registers >= 0, ">= 0"),
            ("pred_capacity", cap, 0 < cap <= 1, "in (0, 1]"),
            ("pred_repeats", rep, rep >= 1, ">= 1"),
            ("pred_window", self.pred_window, self.pred_window >= 1, ">= 1"),
            ("pred_capacity", cap, disjoint_ok,
             f"<= 1 / pred_repeats ({rep}) for disjoint subsets (or set model.pred_replacement)"),
            ("tome_rates", self.tome_rates,
             all(isinstance(r, int) and r >= 0 for r in self.tome_rates), "a list of ints >= 0"),
            ("moe_experts", self.moe_experts, self.moe_experts >= 0, ">= 0"),
            ("moe_capacity", self.moe_capacity, self.moe_capacity > 0, "> 0"),
            ("moe_threshold", self.moe_threshold, 0 <= self.moe_threshold <= 1, "in [0, 1]"),
            ("moe_aux_weight", self.moe_aux_weight, self.moe_aux_weight >= 0, ">= 0"),
        ]  # fmt: skip


def encoder_arch(section: ModelSection, img_size: int) -> EncoderArch:
    """The encoder shape: ``model_name`` at ``img_size``/``patch_size``, ``arch`` overrides."""
    width, depth, heads, mlp_ratio = MODEL_SIZES[section.model_name]
    fields = dict(
        img_size=img_size, patch_size=section.patch_size, embed_dim=width, depth=depth,
        num_heads=heads, mlp_ratio=mlp_ratio, norm=section.output_norm,
        block_norm=section.block_norm, norm_affine=section.norm_affine,
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
    ``forward(packed_batch)``: predictions (R, Lt, D) at the packed target tokens (packing.py).
    """

    def __init__(
        self, encoder: IJEPAVisionTransformer, predictor: IJEPAPredictor, tome_rates=(),
        tome_placement: str = "attention", tome_mode: str = "mean",
    ):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.tome_rates = tuple(tome_rates)  # ToMe in the packed encoder (packing.py)
        self.tome_options = {"tome_placement": tome_placement, "tome_mode": tome_mode}

    def forward(
        self, images: torch.Tensor | PackedBatch, masks_enc: Optional[Masks] = None,
        masks_pred: Optional[Masks] = None, drop: Optional[TokenDrop] = None,
    ) -> torch.Tensor:  # fmt: skip
        if isinstance(images, PackedBatch):
            b = images
            ctx = encode_packed(
                self.encoder, b.ctx_px, b.ctx_ids, b.ctx_gsample, b.grids, self.tome_rates,
                **self.tome_options,
            )  # fmt: skip
            return predict_packed(
                self.predictor, ctx, b.ctx_ids, b.ctx_gsample, b.tgt_ids, b.tgt_gsample, b.grids
            )
        ctx = encode_masked(self.encoder, images, masks_enc)
        if drop is None:
            return self.predictor(ctx, masks_enc, masks_pred)
        return self.predictor(select_context(ctx, drop), drop.masks_enc, drop.masks_pred)


def build_models(
    section: ModelSection, img_size: int
) -> tuple[IJEPAVisionTransformer, IJEPAPredictor, IJEPAVisionTransformer]:
    """Fresh ``(encoder, predictor, target_encoder)`` with the official init; the target
    encoder is a frozen copy of the encoder and the sin-cos position tables are not trained."""
    arch = encoder_arch(section, img_size)
    if section.pos_embed == "sincos" and not section.num_registers and not section.moe_experts:
        encoder = create_encoder(arch, pos_embed_kind="sincos", drop_path_rate=section.drop_path)
    else:
        encoder = create_variant_encoder(
            arch, section.pos_embed, section.num_registers, section.rope_theta, section.drop_path,
            section.moe_experts, section.moe_capacity, section.moe_threshold,
        )  # fmt: skip
    official_init_(encoder, encoder.blocks)
    if section.pos_embed == "sincos":
        encoder.pos_embed.requires_grad_(False)
    pred_arch = PredictorArch(
        grid=img_size // arch.patch_size, embed_dim=arch.embed_dim,
        predictor_embed_dim=section.pred_emb_dim, depth=section.pred_depth,
        num_heads=arch.num_heads, num_registers=section.pred_num_registers,
    )  # fmt: skip
    stop_sigma = section.stop_sigma if section.stop else 0.0
    predictor = IJEPAPredictor(pred_arch, drop_path_rate=section.drop_path, stop_sigma=stop_sigma)
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
    """``t = momentum * t + (1 - momentum) * s`` for every parameter pair (official order)."""
    t_params = list(target.parameters())
    s_params = [p.detach() for p in source.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
