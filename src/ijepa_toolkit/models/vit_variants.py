"""Encoder options of variable-resolution I-JEPA: position kinds and register tokens.

``VariantViT`` is an ``IJEPAVisionTransformer`` (so a timm ``VisionTransformer``) with
- ``pos_kind``: ``sincos`` / ``learned`` (the parent's table), ``factorized`` (learned row and
  column tables ``pos_embed_row`` (1, Gh, D) + ``pos_embed_col`` (1, Gw, D), indexed by absolute
  patch row / column: a smaller grid takes the first rows / columns, as the seeds do) or
  ``rope`` (2D rotary embedding on q/k: half the head dimension rotates with the row index,
  half with the column index, frequencies ``theta ** (-i / (head_dim / 4))``);
- ``moe_experts``: every block's MLP is a ``DiffMoEMlp`` (diffmoe.py; ``eval()`` switches from
  expert-choice to predicted dynamic capacity);
- ``mlp_act``: the MLP activation, ``gelu`` (exact, timm's default) or ``gelu_tanh`` (timm's
  ``GELUTanh``, the tanh approximation); ``qk_norm``: per-head ``layernorm`` / ``dyntanh`` over
  head_dim on q and k (timm's ``Attention`` ``q_norm`` / ``k_norm``, applied before RoPE);
- ``num_registers``: learned register tokens (timm's ``reg_token``), prepended after the
  positions, never rotated, and removed by ``forward_features`` -- so they are neither targets
  nor pooled, and the (B, N, D) patch-token contract is the parent's.

A state dict says which options it holds (``reg_token``, ``pos_embed_row``, ``rope.freqs``,
``blocks.0.attn.q_norm.*``; ``mlp_act`` has no tensor: the format records it), so
``load_encoder`` rebuilds the same class from the tensors alone (``variant_from_state``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Attention
from torch import nn

from ..errors import UserError
from .diffmoe import DiffMoEMlp
from .norms import norm_layer as make_norm_layer
from .pos_embed import sincos_2d
from .vit import EncoderArch, IJEPAVisionTransformer, Masks, apply_masks, infer_encoder_arch

POS_KINDS = ("sincos", "learned", "factorized", "rope")
MOE_KEY = "blocks.0.mlp.router.weight"
QK_KEY = "blocks.0.attn.q_norm.weight"
VARIANT_KEYS = ("reg_token", "pos_embed_row", "rope.freqs", MOE_KEY, QK_KEY)
MLP_ACTS = ("gelu", "gelu_tanh")


def grid_positions(h: int, w: int, device=None) -> torch.Tensor:
    """(H*W, 2) float (row, column) of a row-major grid."""
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).float()


def factorized_positions(row: torch.Tensor, col: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(1, H*W, D) ``row[r] + col[c]`` of a row-major H x W grid, by absolute patch index.

    ``row`` (1, Gh, D) / ``col`` (1, Gw, D): a smaller grid uses the first H rows / W columns (no
    resampling), as the featurenorm and IJEPA-Enhanced seeds index their tables; a grid larger
    than a table raises ``UserError`` naming the table size.
    """
    if h > row.shape[1] or w > col.shape[1]:
        raise UserError(
            f"a {h}x{w} patch grid does not fit the factorised position tables "
            f"({row.shape[1]} rows x {col.shape[1]} columns): use images of at most that many "
            "patches per side"
        )
    return (row[:, :h, None] + col[:, None, :w]).reshape(1, h * w, -1)


def set_qk_norm(blocks: Iterable[nn.Module], layer: Callable[[int], nn.Module]) -> None:
    """Give every timm block's attention per-head q/k norms ``layer(head_dim)`` (timm's
    ``q_norm`` / ``k_norm``, applied to (B, H, N, head_dim) q and k before the product)."""
    for block in blocks:
        block.attn.q_norm = layer(block.attn.head_dim)
        block.attn.k_norm = layer(block.attn.head_dim)


def qk_norm_of_state(state: dict, block: str = "blocks.0") -> Optional[str]:
    """The q/k norm kind ``block`` (a key prefix) holds in ``state``: None, dyntanh, layernorm."""
    if f"{block}.attn.q_norm.weight" not in state:
        return None
    return "dyntanh" if f"{block}.attn.q_norm.alpha" in state else "layernorm"


class Rope2D(nn.Module):
    """Axial 2D rotary embedding; ``freqs`` (head_dim / 4,) and ``grid`` are persistent buffers."""

    def __init__(self, head_dim: int, grid: tuple[int, int], theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        self.register_buffer("freqs", theta ** (-torch.arange(quarter).float() / quarter))
        self.register_buffer("grid", torch.tensor(grid))  # pretraining grid, for the loader
        self.pos: Optional[torch.Tensor] = None  # (B, N, 2) positions of the current forward

    def angles(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) positions -> (B, 1, N, head_dim) angles laid out for ``rotate``."""
        ang = torch.cat([pos[..., :1] * self.freqs, pos[..., 1:] * self.freqs], dim=-1)
        return torch.cat([ang, ang], dim=-1).unsqueeze(1)

    @staticmethod
    def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Rotate (B, H, N, hd) pairs ``(x[j], x[j + hd/2])`` by ``angles`` (B, 1, N, hd)."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


class RopeAttention(Attention):
    """timm ``Attention`` with 2D RoPE on q and k of the last N_pos tokens (registers first)."""

    def __init__(self, *args, rope: Rope2D, **kwargs):
        super().__init__(*args, **kwargs)
        self._rope = [rope]  # shared with the encoder, not a submodule (no duplicate keys)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        rope = self._rope[0]
        angles = rope.angles(rope.pos.to(q.dtype))
        start = n - angles.shape[2]  # register tokens are not rotated
        q = torch.cat([q[:, :, :start], rope.rotate(q[:, :, start:], angles)], dim=2)
        k = torch.cat([k[:, :, :start], rope.rotate(k[:, :, start:], angles)], dim=2)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


class VariantViT(IJEPAVisionTransformer):
    """I-JEPA encoder with ``pos_kind`` positions and ``num_registers`` register tokens."""

    def __init__(
        self, *args, pos_kind: str = "sincos", num_registers: int = 0,
        rope_theta: float = 10000.0, moe_experts: int = 0, moe_capacity: float = 1.0,
        moe_threshold: float = 0.5, mlp_act: str = "gelu", qk_norm_layer=None, **kwargs,
    ):  # fmt: skip
        if pos_kind not in POS_KINDS:
            raise ValueError(f"pos_kind must be one of {POS_KINDS}, got {pos_kind!r}")
        if mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {MLP_ACTS}, got {mlp_act!r}")
        table = pos_kind in ("sincos", "learned")
        super().__init__(
            *args, pos_embed_kind=pos_kind if table else "sincos",
            pos_embed="learn" if table else "none", reg_tokens=num_registers,
            no_embed_class=True, act_layer=mlp_act, **kwargs,
        )  # fmt: skip
        self.pos_kind, self.mlp_act = pos_kind, mlp_act
        self.pos_embed_kind = pos_kind  # what load_encoder logs; the parent reads it for tables
        gh, gw = self.patch_embed.grid_size
        if pos_kind == "factorized":
            self.pos_embed_row = nn.Parameter(
                trunc_normal_(torch.zeros(1, gh, self.embed_dim), std=0.02)
            )
            self.pos_embed_col = nn.Parameter(
                trunc_normal_(torch.zeros(1, gw, self.embed_dim), std=0.02)
            )
        self.rope = None
        if pos_kind == "rope":
            self.rope = Rope2D(
                self.embed_dim // self.blocks[0].attn.num_heads, (gh, gw), rope_theta
            )
            for block in self.blocks:
                old = block.attn
                block.attn = RopeAttention(
                    self.embed_dim, old.num_heads, qkv_bias=old.qkv.bias is not None,
                    rope=self.rope,
                )  # fmt: skip
        if qk_norm_layer is not None:
            set_qk_norm(self.blocks, qk_norm_layer)
        if self.reg_token is not None:
            trunc_normal_(self.reg_token, std=0.02)
        for block in self.blocks if moe_experts else ():
            hidden = block.mlp.fc1.out_features
            block.mlp = DiffMoEMlp(self.embed_dim, hidden, moe_experts, moe_capacity, moe_threshold)

    def pos_embed_for_grid(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(1, H*W, D) additive positions; zeros for ``rope`` (positions act in attention)."""
        h, w = grid_hw
        if self.pos_kind == "factorized":
            return factorized_positions(self.pos_embed_row, self.pos_embed_col, h, w)
        if self.pos_kind == "rope":
            return self.patch_embed.proj.weight.new_zeros(1, h * w, self.embed_dim)
        return super().pos_embed_for_grid(grid_hw)

    def _with_registers(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Set the RoPE positions (B, N, 2) and prepend the registers: (B, R + N, D)."""
        if self.rope is not None:
            self.rope.pos = pos.expand(tokens.shape[0], -1, -1)
        if self.reg_token is None:
            return tokens
        return torch.cat([self.reg_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        tokens = super()._pos_embed(x)
        return self._with_registers(tokens, grid_positions(h, w, x.device)[None])

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal=False) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens after the final norm (registers removed)."""
        return super().forward_features(x, attn_mask, is_causal)[:, self.num_prefix_tokens :]

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """Mean of the (B, N, D) patch tokens ``forward_features`` returns: (B, D)."""
        return x.mean(dim=1)

    def encode_masked(self, x: torch.Tensor, masks: Masks) -> torch.Tensor:
        """Kept patches only (see ``vit.encode_masked``): (M*B, K, D), registers removed."""
        return self.encode_masked_registers(x, masks)[0]

    def encode_masked_registers(
        self, x: torch.Tensor, masks: Masks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_masked`` and the (M*B, R, D) register outputs (after the final norm)."""
        patches = self.patch_embed(x)
        b, h, w, _ = patches.shape
        tokens = apply_masks(IJEPAVisionTransformer._pos_embed(self, patches), masks)
        pos = apply_masks(grid_positions(h, w, x.device)[None].expand(b, -1, -1), masks)
        tokens = self.norm(self.blocks(self._with_registers(tokens, pos)))
        n = self.num_prefix_tokens
        return tokens[:, n:], tokens[:, :n]


def create_variant_encoder(
    arch: EncoderArch, pos_kind: str = "sincos", num_registers: int = 0,
    rope_theta: float = 10000.0, drop_path_rate: float = 0.0, moe_experts: int = 0,
    moe_capacity: float = 1.0, moe_threshold: float = 0.5, mlp_act: str = "gelu",
    qk_norm: Optional[str] = None,
) -> VariantViT:  # fmt: skip
    """A fresh ``VariantViT`` of ``arch`` (sin-cos table filled for ``sincos``); ``qk_norm``:
    None or the per-head norm kind (LayerNorm eps ``arch.layernorm_eps``, DynTanh affine)."""
    norm = make_norm_layer(arch.block_norm, arch.layernorm_eps, arch.norm_affine)
    qk_layer = None if qk_norm is None else make_norm_layer(qk_norm, arch.layernorm_eps)
    model = VariantViT(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
        num_classes=0, global_pool="avg", embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias,
        class_token=False, fc_norm=False, dynamic_img_size=True, drop_path_rate=drop_path_rate,
        norm_layer=norm, pos_kind=pos_kind, num_registers=num_registers, rope_theta=rope_theta,
        moe_experts=moe_experts, moe_capacity=moe_capacity, moe_threshold=moe_threshold,
        mlp_act=mlp_act, qk_norm_layer=qk_layer,
    )  # fmt: skip
    if arch.own_output_norm():
        model.norm = make_norm_layer(arch.norm, arch.layernorm_eps, arch.output_affine())(
            arch.embed_dim
        )
    if pos_kind == "sincos":
        with torch.no_grad():
            model.pos_embed.copy_(sincos_2d(arch.embed_dim, model.patch_embed.grid_size))
    model.arch = arch
    return model


def is_variant_state(state: dict) -> bool:
    """True when the encoder tensors hold a ``VariantViT`` option."""
    return any(k in state for k in VARIANT_KEYS)


def variant_from_state(
    state: dict, num_heads: Optional[int], pos_kind_of_table: str
) -> tuple[EncoderArch, dict]:
    """``(arch, options)`` of a ``VariantViT`` state dict; options for ``create_variant_encoder``.

    ``pos_kind_of_table`` is the kind of a stored ``pos_embed`` (sincos / learned). The RoPE
    grid is stored in ``rope.grid``; raises ``KeyError`` / ``ValueError`` as ``infer_encoder_arch``.
    """
    options = {"num_registers": state["reg_token"].shape[1] if "reg_token" in state else 0}
    if QK_KEY in state:
        options["qk_norm"] = qk_norm_of_state(state)
    if "pos_embed_row" in state:
        options["pos_kind"] = "factorized"
        side = state["pos_embed_row"].shape[1]
    elif "rope.freqs" in state:
        freqs = state["rope.freqs"]
        options["pos_kind"] = "rope"
        options["rope_theta"] = float(freqs[1] ** (-len(freqs))) if len(freqs) > 1 else 10000.0
        side = int(state["rope.grid"][0])
    else:
        options["pos_kind"] = pos_kind_of_table
        side = None
    if side is not None:  # infer_encoder_arch reads the pretraining grid off pos_embed's length
        state = {**state, "pos_embed": torch.empty(1, side * side, 0)}
    if MOE_KEY in state:  # ... and the MLP width off blocks.0.mlp.fc1
        options["moe_experts"] = state[MOE_KEY].shape[0]
        hidden = state["blocks.0.mlp.experts.0.fc1.weight"].shape[0]
        state = {**state, "blocks.0.mlp.fc1.weight": torch.empty(hidden, 0)}
    return infer_encoder_arch(state, num_heads), options
