"""The official I-JEPA predictor (same parameter names), built from timm blocks, with StoP.

Target-token inputs (``target_input``, recorded with sigma in ``IJEPAPredictor.settings``):

- ``mask_token``: the official I-JEPA forward, ``mask_token + position``;
- ``stop_noise``: StoP (Bar et al., 2024, "Stochastic positional embeddings improve masked image
  modeling"; amirbar/StoP ``src/deit.py`` ``VisionTransformerPredictor.forward`` @ 72206b3):
  ``position + predictor_embed(n)``, ``n ~ N(0, stop_sigma^2 I)`` in the encoder width, drawn per
  target mask with ``torch.normal`` in train and eval mode alike (StoP has no deterministic
  forward). The noise goes through the linear layer that embeds the context tokens; the mask
  token is never used (kept, frozen, so checkpoints keep the official key names). StoP's configs
  use sigma 0.25 (ViT-B/16, ViT-L/16) and 0.2 (ViT-H/16). Pass a ``torch.Generator`` to
  ``forward`` to reproduce a draw exactly (the same draws as StoP's code with that generator);
- ``stop_zero_noise``: StoP's forward with the noise set to zero, ``position +
  predictor_embed(0)`` = ``position + predictor_embed.bias``: deterministic.

Registers (Darcet et al., 2024): ``arch.num_registers = N > 0`` adds a learned
``predictor_registers`` (1, N, Dp) prepended to every predictor sequence and dropped before
``predictor_proj``'s output is returned, so they are never predictions and never in the loss.
With N = 0 (default) the module has exactly the official parameters and forward.

Encoder registers (elucidating-featurenorm-ijepa ``Predictor.forward``, ``src/model.py`` @
eb093c2): ``forward(..., registers=r)`` with the context encoder's (B', R, D) register outputs
adds R context tokens at the position of patch (0, 0) (the seed's register position ids), never
predicted: ``predictor_embed(r)`` when the predictor has no registers of its own, else its
``predictor_registers`` in their place (``zero_encoder_registers``, the seed's default
``should_zero_ctx_register_tokens``) or added to them.

ToMe (IJEPA-Enhanced ``Predictor`` / ``TomeBlocks``, ``ijepa_enhanced/vit.py`` @ 03b6a50):
``tome_rates`` (one count per block, default none) merges tokens after each block's attention,
``tome_mode`` ``drop`` by default (Enhanced's ``Predictor.forward`` leaves ``TomeBlocks``' default
mode); the final norm sees the merged tokens, which are then unmerged (models/tome.py).

Block options (``PredictorArch``; the defaults are the official LayerNorm timm blocks): the
featurenorm seed's predictor blocks share its encoder's block config
(``src/transformer_blocks.py`` ``TransformerBlock`` @ eb093c2), reachable as ``block_norm``
``dyntanh`` (with ``norm_affine``), ``qk_norm`` per-head ``layernorm`` / ``dyntanh``,
``qkv_bias`` / ``proj_bias`` false and ``mlp_act`` ``gelu_tanh``; built as the encoder builds them
(``models/norms.py``, ``vit_variants.set_qk_norm``). Every option but ``mlp_act`` shows in the
tensors (``infer_predictor_arch``); the toolkit format records ``mlp_act`` (formats/toolkit.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Literal, Optional, Sequence

import torch
from timm.layers import get_act_layer, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .norms import norm_layer as make_norm_layer
from .pos_embed import sincos_2d
from .tome import tome_blocks
from .vit import Masks, apply_masks, block_rows, count_blocks, heads_for_width
from .vit_variants import MLP_ACTS, qk_norm_of_state, set_qk_norm

TargetInput = Literal["mask_token", "stop_noise", "stop_zero_noise"]
TARGET_INPUTS = ("mask_token", "stop_noise", "stop_zero_noise")


@dataclass
class PredictorArch:
    """Predictor shape; ``grid`` is the pretraining grid side (patches per row)."""

    grid: int
    embed_dim: int
    predictor_embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    num_registers: int = 0  # learned predictor register tokens (0: the official predictor)
    block_norm: str = "layernorm"  # norm1/norm2 inside the blocks: layernorm | dyntanh
    norm_affine: bool = True  # the block DynTanh's weight/bias (LayerNorm is always affine)
    qk_norm: Optional[str] = None  # per-head q/k norm over head_dim: None | layernorm | dyntanh
    proj_bias: bool = True  # bias of the attention's output projection
    mlp_act: str = "gelu"  # MLP activation: gelu (exact) | gelu_tanh (no tensor shows it)

    def to_dict(self) -> dict:
        return asdict(self)


def repeat_interleave_batch(x: torch.Tensor, batch: int, repeat: int) -> torch.Tensor:
    """Official helper: (N*B, ...) -> (N*repeat*B, ...), each block of B rows repeated."""
    chunks = x.split(batch, dim=0)
    return torch.cat([c for c in chunks for _ in range(repeat)], dim=0)


class IJEPAPredictor(nn.Module):
    """Narrow ViT that predicts target-patch features from context tokens.

    Called as the official ``predictor(x, masks_x, masks)``: ``x`` (len(masks_x)*B, Kc, D) context
    tokens, ``masks_x`` the context index tensor(s) (B, Kc), ``masks`` the target index tensor(s)
    (B, Kt). Returns (len(masks)*len(masks_x)*B, Kt, D) predictions, mask-major.
    ``target_input`` (module docstring) defaults to ``stop_noise`` when ``stop_sigma > 0``, else
    ``mask_token`` (the exact official forward). ``arch.num_registers > 0`` prepends that many
    learned register tokens (module docstring).
    """

    def __init__(
        self,
        arch: PredictorArch,
        drop_path_rate: float = 0.0,
        stop_sigma: float = 0.0,
        target_input: Optional[TargetInput] = None,
        tome_rates: Sequence[int] = (),
        tome_mode: Literal["mean", "drop"] = "drop",
        zero_encoder_registers: bool = True,
    ):
        super().__init__()
        self.tome_rates, self.tome_mode = tuple(tome_rates), tome_mode
        self.zero_encoder_registers = zero_encoder_registers
        target_input = target_input or ("stop_noise" if stop_sigma > 0 else "mask_token")
        if target_input not in TARGET_INPUTS:
            raise ValueError(f"target_input must be one of {TARGET_INPUTS}, got {target_input!r}")
        self.arch = arch
        self.stop_sigma = stop_sigma
        self.target_input = target_input
        dim = arch.predictor_embed_dim
        norm_layer = partial(nn.LayerNorm, eps=arch.layernorm_eps)
        self.predictor_embed = nn.Linear(arch.embed_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.predictor_pos_embed = nn.Parameter(
            sincos_2d(dim, (arch.grid, arch.grid)), requires_grad=False
        )
        self.predictor_blocks = predictor_blocks(arch, drop_path_rate)
        self.predictor_norm = norm_layer(dim)
        self.predictor_proj = nn.Linear(dim, arch.embed_dim, bias=True)
        trunc_normal_(self.mask_token, std=0.02)
        if arch.num_registers > 0:
            self.predictor_registers = nn.Parameter(torch.zeros(1, arch.num_registers, dim))
            trunc_normal_(self.predictor_registers, std=0.02)
        if target_input != "mask_token":
            self.mask_token.requires_grad_(False)

    @property
    def settings(self) -> dict:
        """What the target tokens are fed (for results): ``target_input`` and ``stop_sigma``."""
        sigma = self.stop_sigma if self.target_input == "stop_noise" else 0.0
        return {"target_input": self.target_input, "stop_sigma": sigma}

    def forward(
        self,
        x: torch.Tensor,
        masks_x: Masks,
        masks: Masks,
        generator: Optional[torch.Generator] = None,
        registers: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``generator``: draws StoP's noise (``stop_noise``), else the global generator;
        ``registers``: (len(x), R, D) encoder register outputs (module docstring)."""
        masks_x = [masks_x] if isinstance(masks_x, torch.Tensor) else list(masks_x)
        masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
        batch = len(x) // len(masks_x)

        x = self.predictor_embed(x)
        pos = self.predictor_pos_embed.expand(batch, -1, -1)
        x = x + apply_masks(pos, masks_x)
        n_context = x.shape[1]

        pred_tokens = torch.cat(
            [self._target_tokens(pos, m, batch, len(masks_x), generator) for m in masks]
        )
        x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens.to(x.dtype)], dim=1)
        prefix = self._prefix(registers, pos[:, :1], len(masks))
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype).expand(len(x), -1, -1), x], dim=1)
        n_prefix = n_context + (0 if prefix is None else prefix.shape[1])
        return self.predictor_proj(self.blocks_forward(x, keep_from=n_prefix))

    def _prefix(
        self, registers: Optional[torch.Tensor], origin: torch.Tensor, repeat: int
    ) -> Optional[torch.Tensor]:
        """Register tokens put before the context: the predictor's own (1, N, Dp), or from the
        (B', R, D) encoder ``registers`` at the (B, 1, Dp) ``origin`` position, repeated for
        each target mask (module docstring); None without either."""
        own = self.predictor_registers if self.arch.num_registers > 0 else None
        if registers is None:
            return own
        if own is not None and own.shape[1] != registers.shape[1]:
            raise ValueError(
                f"{registers.shape[1]} encoder registers for {own.shape[1]} predictor registers"
            )
        origin = origin.repeat(len(registers) // len(origin), 1, 1)
        if own is None:
            tokens = self.predictor_embed(registers)
        elif self.zero_encoder_registers:
            tokens = own.expand(len(registers), -1, -1)
        else:
            tokens = self.predictor_embed(registers) + own
        return (tokens + origin).repeat(repeat, 1, 1)

    def blocks_forward(
        self, x: torch.Tensor, ids: Optional[torch.Tensor] = None,
        attn_mask_fn: Optional[Callable] = None, keep_from: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """The blocks and ``predictor_norm`` on (B, N, Dp) tokens -> (B, N - keep_from, Dp), the
        rows from ``keep_from`` on (without a mask the last block computes only those:
        ``vit.block_rows``, same numbers); with ``tome_rates`` merging after each attention
        (``ids`` (B, N) image ids, -1 padding; ``attn_mask_fn(ids)`` the attention mask), normed
        merged, then unmerged."""
        if any(self.tome_rates):
            return tome_blocks(
                self.predictor_blocks, x, list(self.tome_rates), ids, attn_mask_fn,
                "attention", self.tome_mode, norm=self.predictor_norm,
            )[:, keep_from:]  # fmt: skip
        mask = attn_mask_fn(ids) if attn_mask_fn is not None else None
        last = len(self.predictor_blocks) - 1
        for i, blk in enumerate(self.predictor_blocks):
            if i == last and mask is None and keep_from:
                x, keep_from = block_rows(blk, x, keep_from), 0
            else:
                x = blk(x, attn_mask=mask)
        return self.predictor_norm(x[:, keep_from:])

    def _target_tokens(
        self, pos: torch.Tensor, mask: torch.Tensor, batch: int, repeat: int,
        generator: Optional[torch.Generator],
    ) -> torch.Tensor:  # fmt: skip
        """(repeat*B, Kt, Dp) inputs of one target mask's tokens (module docstring)."""
        target_pos = repeat_interleave_batch(apply_masks(pos, mask), batch, repeat)
        if self.target_input == "mask_token":
            return self.mask_token + target_pos
        if self.target_input == "stop_zero_noise":
            return target_pos + self.predictor_embed.bias
        weight = self.predictor_embed.weight
        size = (*target_pos.shape[:2], self.arch.embed_dim)
        noise = torch.normal(0.0, self.stop_sigma, size, generator=generator,
                             device=weight.device, dtype=weight.dtype)  # fmt: skip
        return target_pos + self.predictor_embed(noise)


def predictor_blocks(arch: PredictorArch, drop_path_rate: float = 0.0) -> nn.ModuleList:
    """``arch.depth`` timm ``Block`` s of width ``predictor_embed_dim`` with the arch's block
    options (module docstring); drop-path rates rise linearly from 0 to ``drop_path_rate``."""
    if arch.mlp_act not in MLP_ACTS:
        raise ValueError(f"mlp_act must be one of {MLP_ACTS}, got {arch.mlp_act!r}")
    norm = make_norm_layer(arch.block_norm, arch.layernorm_eps, arch.norm_affine)
    act = nn.GELU if arch.mlp_act == "gelu" else get_act_layer(arch.mlp_act)  # the official class
    rates = torch.linspace(0, drop_path_rate, arch.depth, device="cpu").tolist()
    blocks = nn.ModuleList(
        Block(arch.predictor_embed_dim, arch.num_heads, arch.mlp_ratio, qkv_bias=arch.qkv_bias,
              drop_path=r, norm_layer=norm, act_layer=act)
        for r in rates
    )  # fmt: skip
    for block in blocks if not arch.proj_bias else ():  # timm's proj_bias drops the MLP's too
        block.attn.proj.register_parameter("bias", None)
    if arch.qk_norm is not None:
        set_qk_norm(blocks, make_norm_layer(arch.qk_norm, arch.layernorm_eps))
    return blocks


def infer_predictor_arch(state_dict: dict, num_heads: Optional[int] = None) -> PredictorArch:
    """Read the predictor shape off its tensors. Heads default to the encoder width's table;
    a ``predictor_registers`` (1, N, Dp) tensor gives ``num_registers = N``; the block options
    but ``mlp_act`` (left ``gelu``: no tensor shows it) are read off the first block."""
    dim, embed_dim = state_dict["predictor_embed.weight"].shape
    depth = count_blocks(state_dict, "predictor_blocks")
    hidden = state_dict["predictor_blocks.0.mlp.fc1.weight"].shape[0]
    num_patches = state_dict["predictor_pos_embed"].shape[1]
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"predictor_pos_embed has {num_patches} positions, not a square grid")
    heads = heads_for_width(embed_dim, num_heads, what="encoder (the predictor uses its heads)")
    if dim % heads:
        raise ValueError(f"predictor width {dim} is not divisible by num_heads={heads}")
    return PredictorArch(
        grid=grid,
        embed_dim=embed_dim,
        predictor_embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=hidden / dim,
        qkv_bias="predictor_blocks.0.attn.qkv.bias" in state_dict,
        num_registers=(
            state_dict["predictor_registers"].shape[1] if "predictor_registers" in state_dict else 0
        ),
        block_norm="dyntanh" if "predictor_blocks.0.norm1.alpha" in state_dict else "layernorm",
        norm_affine="predictor_blocks.0.norm1.weight" in state_dict,
        qk_norm=qk_norm_of_state(state_dict, "predictor_blocks.0"),
        proj_bias="predictor_blocks.0.attn.proj.bias" in state_dict,
    )
