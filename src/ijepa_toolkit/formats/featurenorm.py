"""featurenorm checkpoints (theAdamColton/elucidating-featurenorm-ijepa @ eb093c21,
``src/trainer.py``) as ``VariantViT`` state dicts, when the file's encoder is expressible.

``Trainer.save_checkpoint`` writes ``{"training_state": {global_step, epoch, num_total_samples},
"grad_scaler", "model": IJEPAModel.state_dict(), "optimizer"}`` and a ``config.yaml`` beside it
(``conf.model.encoder`` = ``EncoderConfig``). ``model`` holds ``encoder.*`` (read as
``encoder``), its EMA ``ema_encoder.*`` (read as ``target_encoder``) and ``predictor.*`` (not
read). The encoder (``src/model.py`` ``Encoder``, blocks of ``src/transformer_blocks.py``):
- ``proj_in``: Linear (D, p*p*C) on patches flattened as ``(PH, PW, C)`` (``src/dataset.py``
  ``patch``), i.e. timm's Conv2d (D, C, p, p) permuted; C = 3;
- blocks: ``norm1`` / ``norm2`` (torch LayerNorm eps 1e-5, or DynTanh ``alpha``/``gamma``/
  ``beta`` = ``VariantViT``'s ``alpha``/``weight``/``bias``), bias-free ``attention.proj_qkv``
  (q, k, v x heads x head_dim, timm's order) and ``proj_out`` (bias zero-filled: the same
  function), optional per-head ``q_norm`` / ``k_norm`` (LayerNorm or DynTanh over head_dim, then
  RoPE: ``VariantViT``'s ``qk_norm``), MLP ``fc1``/``fc2`` of 4 D with ``nn.GELU(approximate=
  "tanh")`` always (``MLP`` hard-codes it: ``mlp_act="gelu_tanh"``);
- positions: ``h_emb`` / ``w_emb`` added by absolute row / column (``VariantViT`` factorised
  tables) or RoPE2D (no tensor; ``use_rope2d``): theta 10000, half of head_dim per axis with the
  toolkit's frequencies, but pairs ``(2j, 2j + 1)`` where ``Rope2D`` pairs ``(j, j + hd/2)``; the
  q / k channels (and their q/k-norm parameters) are permuted so that ``Rope2D`` rotates the same
  pairs -- attention scores are a dot product, invariant under one permutation of q and k;
- ``norm_out``: LayerNorm or DynTanh (``norm_elementwise_affine=False``: weight 1, bias 0).
The flags without a tensor (``use_rope2d``, ``num_attention_heads``, the grid) come from the
``config.yaml`` (or ``<stem>.config.yaml``) beside the file, else ``EncoderConfig``'s defaults.
Not expressible, named by ``missing_pieces``: a head_dim free of the width, ``RunningBatchNorm``
or no output norm, register tokens, DiffMoE MLPs, RoPE together with tables, non-square tables.
The seed's probes read the last block *without* ``norm_out``; ``forward_features`` applies it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..errors import CheckpointError
from ..io.read import RawCheckpoint
from ..models.vit import heads_for_width
from ..models.vit_variants import Rope2D
from .canonical import Contents, scalars_of

NAME = "featurenorm"
DESCRIPTION = "elucidating-featurenorm-ijepa training checkpoint (ema_encoder = target_encoder)"
ENC = "encoder."
ENCODERS = {"ema_encoder.": "target_encoder", "encoder.": "encoder"}
FEATURENORM_EPS = 1e-5  # torch's LayerNorm default, every LayerNorm of the seed
CHANNELS = 3
ROPE_THETA = 10000.0  # RopePosEmbedND's default, which Encoder keeps
GRID = 64  # EncoderConfig.max_num_height_tokens / max_num_width_tokens default
WHAT = "RoPE encoder without a config.yaml beside the file (it names the heads):"
RENAMES = (
    (".attention.proj_qkv.", ".attn.qkv."), (".attention.proj_out.", ".attn.proj."),
    (".attention.", ".attn."), (".gamma", ".weight"), (".beta", ".bias"),
)  # fmt: skip


def matches(raw: RawCheckpoint) -> bool:
    """``{"training_state", "model": {"encoder.proj_in.weight", ...}, ...}``."""
    model = raw.obj.get("model")
    return (
        "training_state" in raw.obj
        and isinstance(model, dict)
        and (ENC + "proj_in.weight" in model)
    )


def encoder_config(path: Path) -> dict:
    """``conf.model.encoder`` of the ``<stem>.config.yaml`` / ``config.yaml`` beside ``path``
    (what ``Trainer.save_checkpoint`` writes), or {} when there is none."""
    for side in (path.with_name(f"{path.stem}.config.yaml"), path.with_name("config.yaml")):
        if side.is_file():
            try:
                conf = yaml.safe_load(side.read_text()) or {}
                return conf["conf"]["model"]["encoder"]
            except (yaml.YAMLError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{side}: not a featurenorm config.yaml (expected conf.model.encoder: {e})"
                ) from None
    return {}


def uses_rope(model: dict, cfg: dict) -> bool:
    """``use_rope2d`` from the config; without one, RoPE exactly when there are no tables."""
    return bool(cfg.get("use_rope2d", ENC + "h_emb" not in model))


def missing_pieces(model: dict, cfg: dict) -> list[str]:
    """What the encoder tensors of ``model`` (an ``IJEPAModel`` state dict) and its config need
    beyond ``VariantViT``, each naming the tensors or flag that show it."""
    block = ENC + "blocks.0."
    pieces = []
    qkv, proj_in = model.get(block + "attention.proj_qkv.weight"), model[ENC + "proj_in.weight"]
    if qkv is not None and qkv.shape[0] != 3 * proj_in.shape[0]:
        pieces.append(
            f"a head_dim independent of the width (attention.proj_qkv: heads x head_dim = "
            f"{qkv.shape[0] // 3}, width {proj_in.shape[0]})"
        )
    if ENC + "norm_out.running_mean" in model:
        pieces.append("RunningBatchNorm output norm (norm_out.running_mean/running_std)")
    elif cfg.get("norm_out_mode") == "disabled":
        pieces.append("no output norm (norm_out_mode: disabled)")
    if ENC + "reg_emb" in model:
        pieces.append("register tokens added to packed input tokens (reg_emb)")
    if block + "mlp.fc1.weight" not in model:
        pieces.append("the DiffMoE MLP layout (blocks.<i>.mlp without fc1; mlp_mode diffmoe)")
    return pieces + position_pieces(model, cfg)


def position_pieces(model: dict, cfg: dict) -> list[str]:
    """The position schemes ``VariantViT`` lacks (see ``missing_pieces``)."""
    rows, cols = model.get(ENC + "h_emb"), model.get(ENC + "w_emb")
    rope = uses_rope(model, cfg)
    if rows is None:
        return [] if rope else ["no positions at all (use_rope2d and use_abs_pos_emb off)"]
    pieces = ["RoPE2D together with h_emb/w_emb tables"] if rope else []
    if rows.shape[0] != cols.shape[0]:
        pieces.append(f"non-square position tables (h_emb {rows.shape[0]}, w_emb {cols.shape[0]})")
    return pieces


def read(raw: RawCheckpoint) -> Contents:
    """Both encoders with ``VariantViT`` names; raises ``CheckpointError`` naming the missing
    pieces when the file's encoder is not expressible."""
    model, cfg = raw.obj["model"], encoder_config(Path(raw.path))
    pieces = missing_pieces(model, cfg)
    if pieces:
        raise CheckpointError(
            f"{raw.path}: a featurenorm (elucidating-featurenorm-ijepa) checkpoint; its encoder is "
            f"not expressible as this toolkit's VariantViT: missing {'; '.join(pieces)}"
        )
    heads = num_heads(model, cfg)
    grid = (cfg.get("max_num_height_tokens", GRID), cfg.get("max_num_width_tokens", GRID))
    rope = uses_rope(model, cfg)
    try:  # RoPE permutes within heads: a file without config or q/k norm has standard heads
        width = model[ENC + "proj_in.weight"].shape[0]
        rope_heads = heads_for_width(width, heads, WHAT) if rope else None
        encoders = {
            which: convert(under(model, prefix), rope_heads, grid)
            for prefix, which in ENCODERS.items()
        }
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{raw.path}: not a usable featurenorm checkpoint ({e})") from None
    state = raw.obj["training_state"]
    state = state if isinstance(state, dict) else {}
    return Contents(
        path=raw.path, format=NAME, encoders=encoders, epoch=state.get("epoch"), num_heads=heads,
        layernorm_eps=FEATURENORM_EPS, ignored=["predictor"],
        other_keys=[k for k in raw.obj if k != "model"], meta=scalars_of(state, list(state)),
        variant={"mlp_act": "gelu_tanh"},
    )  # fmt: skip


def num_heads(model: dict, cfg: dict) -> int | None:
    """``num_attention_heads`` of the config, else width / the q-norm's head_dim, else None."""
    attention = (cfg.get("block_config") or {}).get("attention_config") or {}
    if "num_attention_heads" in attention:
        return int(attention["num_attention_heads"])
    block = ENC + "blocks.0.attention.q_norm."
    norm = model.get(block + "alpha", model.get(block + "weight"))
    return None if norm is None else model[ENC + "proj_in.weight"].shape[0] // norm.shape[0]


def under(model: dict, prefix: str) -> dict:
    """The tensors of ``model`` under ``prefix``, prefix removed."""
    return {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}


def rename(key: str) -> str:
    """A seed block / norm key with ``VariantViT`` names."""
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def convert(sd: dict, rope_heads: int | None, grid: tuple[int, int]) -> dict:
    """One ``Encoder`` state dict -> a ``VariantViT`` state dict (see the module doc);
    ``rope_heads``: the number of heads for a RoPE encoder (None: factorised tables).

    Raises ``KeyError`` naming a missing tensor, ``ValueError`` for unusable shapes.
    """
    weight = sd["proj_in.weight"]  # (D, p * p * C), (PH, PW, C) order
    dim, flat = weight.shape
    p = round((flat / CHANNELS) ** 0.5)
    if CHANNELS * p * p != flat:
        raise ValueError(f"proj_in.weight has {flat} inputs; expected 3 * p * p")
    out = {
        "patch_embed.proj.weight": weight.reshape(dim, p, p, CHANNELS).permute(0, 3, 1, 2),
        "patch_embed.proj.bias": sd["proj_in.bias"],
    }
    if "h_emb" in sd:
        out.update(pos_embed_row=sd["h_emb"][None], pos_embed_col=sd["w_emb"][None])
    for k, v in sd.items():
        if k.startswith(("blocks.", "norm_out.")):
            out[rename(k.replace("norm_out.", "norm.", 1))] = v
    out.setdefault("norm.weight", torch.ones(dim, dtype=weight.dtype))
    out.setdefault("norm.bias", torch.zeros(dim, dtype=weight.dtype))
    depth = sum(1 for k in out if k.endswith(".attn.qkv.weight"))
    for i in range(depth):
        out.setdefault(f"blocks.{i}.attn.proj.bias", torch.zeros(dim, dtype=weight.dtype))
    if rope_heads is not None:
        head_dim = dim // rope_heads
        rope = Rope2D(head_dim, grid, ROPE_THETA)
        out.update({f"rope.{k}": v for k, v in rope.state_dict().items()})
        permute_for_rope(out, depth, rope_heads, head_dim)
    return {k: v.contiguous() for k, v in out.items()}


def rope_order(head_dim: int) -> torch.Tensor:
    """(head_dim,) seed channel of each ``Rope2D`` channel: the seed rotates pairs
    ``(a * hd/2 + 2j, a * hd/2 + 2j + 1)`` of axis a, frequency j; ``Rope2D`` pairs
    ``(a * hd/4 + j, a * hd/4 + j + hd/2)``."""
    quarter = head_dim // 4
    first = (torch.arange(2)[:, None] * (head_dim // 2) + 2 * torch.arange(quarter)).reshape(-1)
    return torch.cat([first, first + 1])


def permute_for_rope(out: dict, depth: int, heads: int, head_dim: int) -> None:
    """Reorder, in place, each head's q and k channels (qkv rows, q/k-norm parameters) by
    ``rope_order``; v and the attention scores are unchanged."""
    order = rope_order(head_dim)
    for i in range(depth):
        key = f"blocks.{i}.attn.qkv.weight"
        qkv = out[key].reshape(3, heads, head_dim, -1).clone()
        qkv[:2] = qkv[:2, :, order]
        out[key] = qkv.reshape(3 * heads * head_dim, -1)
        for name in ("q_norm", "k_norm"):
            for part in ("weight", "bias", "alpha"):
                if (k := f"blocks.{i}.attn.{name}.{part}") in out:
                    out[k] = out[k][order]
