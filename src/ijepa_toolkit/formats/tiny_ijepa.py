"""tiny-IJEPA checkpoints (nguyenddang/tiny-IJEPA, nanoGPT-style) as timm ViT state dicts.

Its ``train.py`` saves ``{"model": IJEPA.state_dict(), "model_args", "optimizer", "iter_num",
"config"}``. ``model`` holds ``mask_token``, ``predictor.*`` and two encoders,
``context_encoder.*`` and its EMA ``target_encoder.*`` (read as ``encoder`` and
``target_encoder``), each a ``Vit`` of ``model.py``:

- ``patchify.proj``: ``Conv2d(in_channels, n_embd, patch_size, stride=patch_size)`` applied to
  each patch of ``F.unfold`` (row-major patches), i.e. timm's ``patch_embed.proj``;
- ``wpe``: ``Embedding((img_size // patch_size) ** 2, n_embd)``, learned positions, row-major;
- ``h.{i}``: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; ``attn.c_attn`` gives q, k, v
  (each ``n_embd`` wide, heads ``(n_head, n_embd / n_head)``), ``attn.c_proj``; ``mlp.c_fc`` ->
  exact GELU -> ``mlp.c_proj`` (4x wide);
- ``ln_out``: the final norm; every LayerNorm has torch's default eps 1e-5.

``model_args`` gives ``n_layer``, ``n_head``, ``n_embd``, ``patch_size``, ``in_channels`` and
``bias`` (``False`` drops every Linear/Conv/LayerNorm bias; they are filled with zeros here, the
same function). torch.compile's ``_orig_mod.`` prefix is removed, as its ``train.py`` does.
"""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..io.read import RawCheckpoint
from .canonical import Contents, epoch_of, scalars_of

NAME = "tiny_ijepa"
DESCRIPTION = "tiny-IJEPA (nanoGPT-style) checkpoint"

TINY_IJEPA_EPS = 1e-5
COMPILE_PREFIX = "_orig_mod."
# tiny-IJEPA encoder -> toolkit sub-model name
ENCODERS = {"target_encoder": "target_encoder", "context_encoder": "encoder"}
PATCH = "patchify.proj.weight"

# tiny-IJEPA name (inside h.{i}.) -> timm name (inside blocks.{i}.)
_BLOCK_NAMES = {
    "ln_1": "norm1",
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_KEY = re.compile(r"h\.(\d+)\.(.+)\.(weight|bias)$")


def matches(raw: RawCheckpoint) -> bool:
    """True for ``{"model": tiny-IJEPA state dict, "model_args": dict}``."""
    model, args = raw.obj.get("model"), raw.obj.get("model_args")
    if not isinstance(args, dict) or not isinstance(model, dict):
        return False
    return any(k.removeprefix(COMPILE_PREFIX).endswith("encoder." + PATCH) for k in model)


def read(raw: RawCheckpoint) -> Contents:
    """Both encoders with timm names, ``n_head`` heads and eps 1e-5; the predictor is ignored
    (not the official predictor's layout)."""
    obj = raw.obj
    sd = {k.removeprefix(COMPILE_PREFIX): v for k, v in obj["model"].items()}
    encoders = {}
    try:
        for name, which in ENCODERS.items():
            part = {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
            if part:
                encoders[which] = convert(part, obj["model_args"])
        heads = int(obj["model_args"]["n_head"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{raw.path}: not a usable tiny-IJEPA checkpoint ({e})") from None
    ignored = [k for k in sd if not k.startswith(tuple(f"{n}." for n in ENCODERS))]
    other = [k for k in obj if k != "model"]
    return Contents(
        path=raw.path, format=NAME, encoders=encoders, epoch=epoch_of(obj),
        num_heads=heads, layernorm_eps=TINY_IJEPA_EPS,
        ignored=ignored, other_keys=other, meta=scalars_of(obj, other),
    )  # fmt: skip


def convert(sd: dict, model_args: dict) -> dict:
    """One tiny-IJEPA ``Vit``'s tensors (prefix removed) -> a timm ViT state dict.

    Raises ``KeyError`` naming a missing ``model_args`` entry or tensor, ``ValueError`` for a
    patch embedding of the wrong shape.
    """
    for key in ("n_layer", "n_head", "n_embd", "patch_size"):
        if key not in model_args:
            raise KeyError(f"model_args.{key}")
    dim, p = int(model_args["n_embd"]), int(model_args["patch_size"])
    chans = int(model_args.get("in_channels", 3))
    proj = sd[PATCH]
    if tuple(proj.shape) != (dim, chans, p, p):
        raise ValueError(
            f"{PATCH} has shape {tuple(proj.shape)}; expected ({dim}, {chans}, {p}, {p}) "
            f"for n_embd={dim}, in_channels={chans}, patch_size={p}"
        )
    zeros = torch.zeros(dim, dtype=proj.dtype)
    out = {
        "patch_embed.proj.weight": proj,
        "patch_embed.proj.bias": sd.get("patchify.proj.bias", zeros),
        "pos_embed": sd["wpe.weight"].unsqueeze(0),
        "norm.weight": sd["ln_out.weight"],
        "norm.bias": sd.get("ln_out.bias", zeros),
    }
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in _BLOCK_NAMES:
            out[f"blocks.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"] = value
    for i in range(int(model_args["n_layer"])):  # bias=False: zero biases, same function
        for name in _BLOCK_NAMES.values():
            weight = out.get(f"blocks.{i}.{name}.weight")
            if weight is None:
                raise KeyError(f"h.{i} ({name})")
            out.setdefault(
                f"blocks.{i}.{name}.bias", torch.zeros(weight.shape[0], dtype=proj.dtype)
            )
    return out
