"""IJEPA-Enhanced checkpoints (theAdamColton/ijepa-enhanced, ``ijepa_enhanced/io.py``) as
``VariantViT`` state dicts with factorised positions, when the file's encoder is expressible.

``io.save`` writes ``dict(teacher, student, predictor, optimizer, scaler, global_step, epoch)``;
with ``torch_compile: true`` (its shipped configs) the three models are state dicts
(``_orig_mod.state_dict()``), otherwise the ``nn.Module`` objects themselves: pickled classes,
which ``torch.load(weights_only=True)`` refuses before any format is tried. ``teacher`` (the EMA
encoder, read as ``target_encoder``) / ``student`` (read as ``encoder``) are
``ijepa_enhanced/vit.py`` ``ViT``s (commit 03b6a50f):
- ``patch_embed``: Linear (D, C*p*p) on patches flattened as ``(C, PH, PW)`` (cabbage-patch
  ``unpatch``; ``vit_factory.py`` merges timm's Conv2d the same way), i.e. timm's
  ``patch_embed.proj`` Conv2d (D, C, p, p) reshaped; C = 3 (``image_channels``, never set by its
  configs);
- ``position_embed.h_embed`` (max_height, D) / ``w_embed`` (max_width, D), added, indexed by the
  absolute patch row / column: ``VariantViT``'s ``pos_embed_row`` / ``pos_embed_col``;
- ``blocks.blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` (timm's names; exact
  GELU, softmax attention scaled by head_dim ** -0.5), then ``norm``; every LayerNorm has torch's
  eps 1e-5. ``use_bias: false`` drops every Linear bias: qkv stays bias-free, the others (which
  timm always has) are zeros, the same function.
Not expressible, named by ``missing_pieces``: LayerScale ``ls1`` / ``ls2.gamma``
(``use_layerscale``, off in the shipped configs), the joint table ``position_embed.embed``, and
non-square tables. Token merging (``TomeBlocks``) is a forward argument ``r`` (no tensor; its
``probe_eval`` uses r = 8): the encoder read here is the r = 0 one. The predictor is not read.
The number of heads is not in the file (inferred from the width, or ``num_heads=``).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..io.read import RawCheckpoint
from .canonical import Contents, epoch_of, scalars_of

NAME = "ijepa_enhanced"
DESCRIPTION = "IJEPA-Enhanced training checkpoint (teacher = target_encoder, student = encoder)"
ENHANCED_EPS = 1e-5
CHANNELS = 3
ENCODERS = {"teacher": "target_encoder", "student": "encoder"}
LAYERSCALE = "LayerScale on the residual branches (blocks.blocks.<i>.ls1/ls2.gamma)"
JOINT = "a joint position table indexed by row * max_width + column (position_embed.embed)"
ROW, COL = "position_embed.h_embed", "position_embed.w_embed"
ZERO_BIASES = ("attn.proj", "mlp.fc1", "mlp.fc2")


def matches(raw: RawCheckpoint) -> bool:
    """``{"teacher", "student", "predictor", "global_step", ...}``."""
    return {"teacher", "student", "predictor", "global_step"} <= set(raw.obj)


def missing_pieces(encoder: dict) -> list[str]:
    """What one ``ViT`` state dict needs beyond ``VariantViT``."""
    pieces = [LAYERSCALE] if "blocks.blocks.0.ls1.gamma" in encoder else []
    if "position_embed.embed" in encoder:
        pieces.append(JOINT)
    if ROW in encoder and encoder[ROW].shape[0] != encoder[COL].shape[0]:
        pieces.append(
            f"non-square position tables ({ROW} has {encoder[ROW].shape[0]} rows, {COL} "
            f"{encoder[COL].shape[0]}; VariantViT's tables are square)"
        )
    return pieces


def read(raw: RawCheckpoint) -> Contents:
    """Both encoders with timm / ``VariantViT`` names and eps 1e-5; raises ``CheckpointError``
    naming the teacher's missing pieces when it is not expressible."""
    obj = raw.obj
    teacher = obj["teacher"]
    pieces = (isinstance(teacher, dict) and missing_pieces(teacher)) or []
    if not isinstance(teacher, dict) or pieces:
        raise CheckpointError(
            f"{raw.path}: an IJEPA-Enhanced checkpoint (teacher/student/predictor); its encoder "
            f"is not expressible as this toolkit's VariantViT: missing "
            f"{'; '.join(pieces or ['a converter for it'])}"
        )
    try:
        encoders = {which: convert(obj[name]) for name, which in ENCODERS.items()}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{raw.path}: not a usable IJEPA-Enhanced checkpoint ({e})") from None
    other = [k for k in obj if k not in ENCODERS]
    return Contents(
        path=raw.path, format=NAME, encoders=encoders, epoch=epoch_of(obj),
        layernorm_eps=ENHANCED_EPS, ignored=["predictor"], other_keys=other,
        meta=scalars_of(obj, other),
    )  # fmt: skip


def convert(sd: dict) -> dict:
    """One ``ViT`` state dict -> a factorised ``VariantViT`` state dict (see the module doc).

    Raises ``KeyError`` naming a missing tensor, ``ValueError`` for a patch embedding whose
    input is not 3 * p * p.
    """
    weight = sd["patch_embed.weight"]  # (D, C * p * p), (C, PH, PW) order
    dim, flat = weight.shape
    p = round((flat / CHANNELS) ** 0.5)
    if CHANNELS * p * p != flat:
        raise ValueError(f"patch_embed.weight has {flat} inputs; expected 3 * p * p")
    zeros = torch.zeros(dim, dtype=weight.dtype)
    out = {
        "patch_embed.proj.weight": weight.reshape(dim, CHANNELS, p, p),
        "patch_embed.proj.bias": sd.get("patch_embed.bias", zeros),
        "pos_embed_row": sd[ROW][None],
        "pos_embed_col": sd[COL][None],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    out.update({k.removeprefix("blocks."): v for k, v in sd.items() if k.startswith("blocks.")})
    depth = sum(1 for k in out if k.endswith(".attn.qkv.weight"))
    for i in range(depth):
        for name in ZERO_BIASES:
            rows = out[f"blocks.{i}.{name}.weight"].shape[0]
            out.setdefault(f"blocks.{i}.{name}.bias", torch.zeros(rows, dtype=weight.dtype))
    return out
