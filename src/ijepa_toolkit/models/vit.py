"""I-JEPA encoders as timm VisionTransformers: no class token, average pooling, no fc_norm.

The only behaviour added to timm's class is the position embedding at a grid other than the
pretraining one: the fixed sin-cos table is recomputed exactly for the new grid, a learned table is
resampled bicubically (timm's ``resample_abs_pos_embed``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .norms import norm_layer as make_norm_layer
from .pos_embed import sincos_2d

# Width -> heads of the standard ViT sizes (Ti, S, B, L, H, g).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
# The official model sizes (src/models/vision_transformer.py): width, depth, heads, mlp ratio.
MODEL_SIZES = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}
POS_EMBED_KINDS = ("sincos", "learned")

Masks = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class EncoderArch:
    """Everything needed to build an I-JEPA encoder; ``img_size`` is the pretraining size."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_chans: int = 3
    layernorm_eps: float = 1e-6
    norm: str = "layernorm"  # output norm: layernorm | dyntanh
    block_norm: str = "layernorm"  # norm1/norm2 inside the blocks: layernorm | dyntanh
    norm_affine: bool = True  # DynTanh weight/bias (LayerNorm is always affine)
    norm_out_affine: Optional[bool] = None  # the output DynTanh's (None: norm_affine)

    def to_dict(self) -> dict:
        return asdict(self)

    def output_affine(self) -> bool:
        """Whether the output norm (a DynTanh) has weight/bias."""
        return self.norm_affine if self.norm_out_affine is None else self.norm_out_affine

    def own_output_norm(self) -> bool:
        """The output norm differs from the blocks' (kind or affine): built on its own."""
        return (self.norm, self.output_affine()) != (self.block_norm, self.norm_affine)


def heads_for_width(embed_dim: int, num_heads: Optional[int] = None, what: str = "encoder") -> int:
    """Number of attention heads: the explicit value, else the standard table; else an error."""
    heads = num_heads if num_heads is not None else STANDARD_HEADS.get(embed_dim)
    if heads is None:
        raise ValueError(
            f"{what} width {embed_dim} is not a standard ViT width "
            f"({', '.join(f'{w}:{h}' for w, h in STANDARD_HEADS.items())}); "
            "pass num_heads explicitly"
        )
    if embed_dim % heads:
        raise ValueError(f"{what} width {embed_dim} is not divisible by num_heads={heads}")
    return heads


def _check_divisible(module: nn.Module, args: tuple) -> None:
    x = args[0]
    p_h, p_w = module.patch_size
    h, w = x.shape[-2:]
    if h % p_h or w % p_w:
        raise ValueError(
            f"input size {h}x{w} is not a multiple of the patch size {p_h}x{p_w}; "
            f"resize or crop to e.g. {h // p_h * p_h}x{w // p_w * p_w}"
        )


class IJEPAVisionTransformer(VisionTransformer):
    """timm ViT that runs at any input size that is a multiple of the patch size.

    ``pos_embed_kind`` says how the stored table is extended to other grids: ``"sincos"``
    recomputes the official formula, ``"learned"`` resamples bicubically. At the pretraining grid
    the stored table is always used as is.
    """

    def __init__(self, *args, pos_embed_kind: str = "sincos", **kwargs):
        super().__init__(*args, **kwargs)
        if pos_embed_kind not in POS_EMBED_KINDS:
            raise ValueError(
                f"pos_embed_kind must be one of {POS_EMBED_KINDS}, got {pos_embed_kind!r}"
            )
        self.pos_embed_kind = pos_embed_kind
        self._sincos_cache: dict = {}
        self.patch_embed.register_forward_pre_hook(_check_divisible)

    def pos_embed_for_grid(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(1, H*W, D) position embedding for a grid of H rows and W columns of patches."""
        grid_hw = tuple(grid_hw)
        if grid_hw == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        if self.pos_embed_kind == "learned":
            return resample_abs_pos_embed(
                self.pos_embed, new_size=grid_hw, old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0,
            )  # fmt: skip
        key = (grid_hw, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._sincos_cache:
            table = sincos_2d(self.embed_dim, grid_hw)
            self._sincos_cache[key] = table.to(self.pos_embed.device, self.pos_embed.dtype)
        return self._sincos_cache[key]

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) patch embeddings -> (B, H*W, D) with positions added."""
        b, h, w, d = x.shape
        return self.pos_drop(x.reshape(b, h * w, d) + self.pos_embed_for_grid((h, w)))


def create_encoder(
    arch: EncoderArch,
    pos_embed_kind: str = "sincos",
    drop_path_rate: float = 0.0,
    norm_layer: Optional[type] = None,
) -> IJEPAVisionTransformer:
    """A fresh encoder; a ``sincos`` one has its table filled with the fixed sin-cos values.

    Without ``norm_layer`` the norms follow ``arch.block_norm`` (inside the blocks) and
    ``arch.norm`` (the output norm); an explicit ``norm_layer`` is used for all of them.
    """
    blocks_norm = make_norm_layer(arch.block_norm, arch.layernorm_eps, arch.norm_affine)
    model = IJEPAVisionTransformer(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        num_classes=0,
        global_pool="avg",
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        qkv_bias=arch.qkv_bias,
        class_token=False,
        fc_norm=False,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        norm_layer=norm_layer or blocks_norm,
        pos_embed_kind=pos_embed_kind,
    )
    if norm_layer is None and arch.own_output_norm():
        output_norm = make_norm_layer(arch.norm, arch.layernorm_eps, arch.output_affine())
        model.norm = output_norm(arch.embed_dim)
    if pos_embed_kind == "sincos":
        with torch.no_grad():
            model.pos_embed.copy_(sincos_2d(arch.embed_dim, model.patch_embed.grid_size))
    model.arch = arch
    return model


def infer_encoder_arch(state_dict: dict, num_heads: Optional[int] = None) -> EncoderArch:
    """Read depth, width, patch size, MLP ratio and pretraining grid off the tensors."""
    proj = state_dict["patch_embed.proj.weight"]  # (D, C, p, p)
    embed_dim, in_chans, patch_h, patch_w = proj.shape
    if patch_h != patch_w:
        raise ValueError(f"non-square patches {patch_h}x{patch_w} are not supported")
    depth = count_blocks(state_dict, "blocks")
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    num_patches = state_dict["pos_embed"].shape[1]
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} positions, not a square grid")
    eps = 1e-6
    norm = "dyntanh" if "norm.alpha" in state_dict else "layernorm"
    block_norm = "dyntanh" if "blocks.0.norm1.alpha" in state_dict else "layernorm"
    affine = f"{'blocks.0.norm1' if block_norm == 'dyntanh' else 'norm'}.weight" in state_dict
    out_affine = "norm.weight" in state_dict  # (its own only when both norms are DynTanh)
    own_out = norm == block_norm == "dyntanh" and out_affine != affine
    return EncoderArch(
        img_size=grid * patch_h,
        patch_size=patch_h,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads_for_width(embed_dim, num_heads),
        mlp_ratio=hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        in_chans=in_chans,
        layernorm_eps=eps,
        norm=norm,
        block_norm=block_norm,
        norm_affine=affine,
        norm_out_affine=out_affine if own_out else None,
    )


def count_blocks(state_dict: dict, prefix: str) -> int:
    """Number of transformer blocks: 1 + the highest ``{prefix}.{i}.`` index (KeyError if none)."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for k in state_dict if (m := pattern.match(k))]
    if not indices:
        raise KeyError(f"{prefix}.0.*")
    return 1 + max(indices)


def apply_masks(x: torch.Tensor, masks: Masks) -> torch.Tensor:
    """Keep the indexed tokens: (B, N, D) and (B, K) indices -> (B, K, D).

    A list of M index tensors gives (M*B, K, D), mask-major, as the official ``apply_masks``.
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    kept = []
    for m in masks:
        index = m.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        kept.append(torch.gather(x, 1, index))
    return torch.cat(kept, dim=0)


def encode_masked(encoder: VisionTransformer, x: torch.Tensor, masks: Masks) -> torch.Tensor:
    """The official ``encoder(x, masks)``: tokens of the kept patches only, after the final norm.

    ``x``: (B, C, H, W) images; ``masks``: (B, K) patch indices (row-major) or a list of them.
    Returns (B, K, D), or (M*B, K, D) for M masks.
    """
    if hasattr(encoder, "encode_masked"):  # encoders with registers / RoPE (vit_variants.py)
        return encoder.encode_masked(x, masks)
    tokens = encoder._pos_embed(encoder.patch_embed(x))
    tokens = apply_masks(tokens, masks)
    if encoder.grad_checkpointing and torch.is_grad_enabled():
        tokens = checkpoint_seq(encoder.blocks, tokens)
    else:
        tokens = encoder.blocks(tokens)
    return encoder.norm(tokens)


def block_rows(block: nn.Module, x: torch.Tensor, start: int) -> torch.Tensor:
    """``block(x)[:, start:]`` of a timm ``Block`` on (B, N, D) tokens, computed for those rows
    only: (B, N - start, D).

    Keys and values still come from all N tokens; the queries, the attention output, the MLP and
    the residuals are computed for the kept rows alone, with the same operations in the same
    order, so the numbers are those of the whole block (the predictor's last block keeps only its
    target tokens: most of its rows are context). No attention mask.
    """
    attn, h = block.attn, block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q)[:, :, start:], attn.k_norm(k)
    drop = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    else:
        out = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n - start, -1))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h[:, start:]).sigmoid()
    x = x[:, start:] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
