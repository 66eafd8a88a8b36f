"""Hugging Face transformers I-JEPA (``IJepaModel``): a ``save_pretrained`` folder, or its
``model.safetensors`` (or ``pytorch_model.bin``) with the ``config.json`` beside it.

The Hub checkpoints (``facebook/ijepa_vith14_1k``, ``..._vitg16_22k``, ...) were converted from
the official releases' *context* encoder (``encoder``), not the EMA ``target_encoder``. Files hold
the names transformers has always saved (``embeddings.patch_embeddings.projection``,
``encoder.layer.{i}.attention.attention.{query,key,value}``, ...; ``save_pretrained`` of
transformers 5 still writes them); the in-memory names of transformers 5 (``layers.{i}.attention.
q_proj``, ``mlp.fc1``, ...) and the ``ijepa.`` prefix of ``IJepaForImageClassification`` are read
too. ``config.json`` gives the heads and the LayerNorm eps (the rest is read off the tensors and
checked against it); ``hidden_act`` must be ``gelu`` (exact, as timm's ViT).

``timm_to_hf`` / ``hf_config`` are the inverse, for ``ijepa-export --format hf``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from ..io.read import RawCheckpoint
from ..models.vit import EncoderArch
from .canonical import SINGLE, Contents

NAME = "hf"
DESCRIPTION = "Hugging Face transformers IJepaModel (save_pretrained folder / its weights file)"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ANCHOR = "embeddings.patch_embeddings.projection.weight"
PREFIX = "ijepa."  # IJepaForImageClassification

# timm name -> saved transformers name, inside blocks.{i}. / encoder.layer.{i}.
_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")
_TOP = {
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
# transformers 5 in-memory names -> saved names
_V5 = (
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
    (re.compile(r"\.attention\.([qkv])_proj\."), None),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)
_QKV_LETTER = {"q": "query", "k": "key", "v": "value"}


def locate(folder: Path) -> Optional[Path]:
    """The weights file of a ``save_pretrained`` folder (one holding ``config.json``), else None."""
    if not (folder / CONFIG_FILE).is_file():
        return None
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise CheckpointError(
            f"{folder}: a sharded transformers checkpoint (*.index.json) is not read; save it "
            "again with save_pretrained(..., max_shard_size='100GB') to get one model.safetensors"
        )
    raise CheckpointError(f"{folder}: has {CONFIG_FILE} but none of {', '.join(WEIGHT_FILES)}")


def _saved_name(key: str) -> str:
    """A transformers name in the saved spelling (``ijepa.`` prefix and v5 names undone)."""
    key = key.removeprefix(PREFIX)
    for pattern, repl in _V5:
        if repl is None:
            key = pattern.sub(lambda m: f".attention.attention.{_QKV_LETTER[m.group(1)]}.", key)
        else:
            key = pattern.sub(repl, key)
    return key


def matches(raw: RawCheckpoint) -> bool:
    """True for a transformers I-JEPA state dict (saved or in-memory names)."""
    return any(_saved_name(str(k)) == ANCHOR for k in raw.obj)


def read(raw: RawCheckpoint) -> Contents:
    """The encoder with timm names; heads and eps from the ``config.json`` beside the file."""
    config = read_config(raw.path.parent / CONFIG_FILE, raw.path)
    state = {_saved_name(k): v for k, v in raw.obj.items() if torch.is_tensor(v)}
    try:
        timm_state, ignored = hf_to_timm(state, int(config["num_hidden_layers"]))
    except KeyError as e:
        raise CheckpointError(f"{raw.path}: incomplete transformers weights, missing {e}") from None
    _check_against_config(timm_state, config, raw.path)
    logging.getLogger("ijepa_toolkit").info(
        "%s: transformers IJepaModel weights; the Hub I-JEPA checkpoints hold the context encoder "
        "(the official file's 'encoder'), not the EMA target encoder", raw.path,
    )  # fmt: skip
    return Contents(
        path=raw.path, format=NAME, encoders={SINGLE: timm_state},
        num_heads=int(config["num_attention_heads"]),
        layernorm_eps=float(config.get("layer_norm_eps", 1e-12)), ignored=ignored,
        meta={"encoder": "context (Hub I-JEPA checkpoints)"},
    )  # fmt: skip


def read_config(path: Path, weights: Path) -> dict:
    """``config.json`` of an ``IJepaModel``; ``CheckpointError`` when absent or of another model."""
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise CheckpointError(
            f"{weights}: transformers weights need the {CONFIG_FILE} that save_pretrained "
            f"writes beside them (not found: {path})"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    kind = config.get("model_type")
    if kind != "ijepa":
        raise CheckpointError(f"{path}: model_type is {kind!r}; expected 'ijepa' (IJepaModel)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"{path}: hidden_act={config['hidden_act']!r}; only 'gelu' (exact) has a timm "
            "equivalent"
        )
    for key in ("num_hidden_layers", "num_attention_heads"):
        if key not in config:
            raise CheckpointError(f"{path}: missing '{key}'")
    return config


def hf_to_timm(state: dict, depth: int) -> tuple[dict, list]:
    """Saved transformers names -> (timm ViT state dict, names left out: pooler, mask token, ...).

    Raises ``KeyError`` naming a missing tensor.
    """
    out = {"pos_embed": state["embeddings.position_embeddings"]}
    for timm_name, hf_name in _TOP.items():
        for kind in ("weight", "bias"):
            out[f"{timm_name}.{kind}"] = state[f"{hf_name}.{kind}"]
    for i in range(depth):
        layer = f"encoder.layer.{i}."
        for timm_name, hf_name in _BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{timm_name}.{kind}"] = state[f"{layer}{hf_name}.{kind}"]
        qkv = f"{layer}attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([state[f"{qkv}{n}.weight"] for n in _QKV])
        if f"{qkv}query.bias" in state:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([state[f"{qkv}{n}.bias"] for n in _QKV])
    used = set(timm_to_hf(out))
    return out, [k for k in state if k not in used]


def _check_against_config(state: dict, config: dict, path: Path) -> None:
    """The tensors' patch size, grid and MLP width agree with ``config.json``."""
    width, chans, patch, _ = state["patch_embed.proj.weight"].shape
    found = {
        "hidden_size": width,
        "num_channels": chans,
        "patch_size": patch,
        "image_size": round(state["pos_embed"].shape[1] ** 0.5) * patch,
        "intermediate_size": state["blocks.0.mlp.fc1.weight"].shape[0],
    }
    for key, value in found.items():
        if key in config and config[key] != value:
            raise CheckpointError(
                f"{path}: {CONFIG_FILE} says {key}={config[key]!r} but the weights have {value}"
            )


def timm_to_hf(state: dict) -> dict:
    """timm ViT encoder tensors -> transformers ``IJepaModel`` tensors (saved names)."""
    out = {"embeddings.position_embeddings": state["pos_embed"]}
    block = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        m = block.match(key)
        if key.rsplit(".", 1)[0] in _TOP:
            name, kind = key.rsplit(".", 1)
            out[f"{_TOP[name]}.{kind}"] = value
        elif m and m.group(2) == "attn.qkv":
            layer = f"encoder.layer.{m.group(1)}.attention.attention."
            for n, part in zip(_QKV, value.chunk(3)):
                out[f"{layer}{n}.{m.group(3)}"] = part.contiguous()
        elif m and m.group(2) in _BLOCK:
            out[f"encoder.layer.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = value
    return out


def hf_config(arch: EncoderArch) -> dict:
    """``config.json`` of the ``IJepaModel`` that computes the encoder ``arch`` at its size."""
    return {
        "architectures": ["IJepaModel"],
        "model_type": "ijepa",
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": round(arch.embed_dim * arch.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": arch.layernorm_eps,
        "image_size": arch.img_size,
        "patch_size": arch.patch_size,
        "num_channels": arch.in_chans,
        "qkv_bias": arch.qkv_bias,
        "pooler_output_size": arch.embed_dim,
        "pooler_act": "tanh",
        "initializer_range": 0.02,
    }
