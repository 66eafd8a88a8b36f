"""tiny-IJEPA checkpoints (nanoGPT-style names) as timm ViT state dicts.

A tiny-IJEPA checkpoint is ``{"model": state_dict, "model_args": {...}, ...}`` as nanoGPT writes
it. The encoder is a GPT block stack without the causal mask, over patch tokens:

- ``transformer.wte``: patch embedding, a ``Linear(C*p*p, D)`` over patches flattened in
  ``(channel, row, column)`` order (a ``(D, C, p, p)`` convolution weight is accepted as well);
- ``transformer.wpe``: learned positions, ``(N, D)`` for a square ``N``-patch grid, row-major;
- ``transformer.h.{i}``: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; ``attn.c_attn``
  produces q, k, v (each ``D`` wide, heads split as ``(n_head, D / n_head)``), ``attn.c_proj``;
  ``mlp.c_fc`` -> exact GELU -> ``mlp.c_proj``;
- ``transformer.ln_f``: the final norm; every LayerNorm has eps 1e-5.

``model_args``: ``n_layer``, ``n_head``, ``n_embd``, ``patch_size`` and optionally ``in_chans``
(default 3) and ``bias`` (nanoGPT's ``bias=False`` drops every Linear/LayerNorm bias; they are
filled with zeros here, which computes the same function). torch.compile's ``_orig_mod.`` prefix
is removed, as nanoGPT does when it resumes.
"""

from __future__ import annotations

import re

import torch

TINY_IJEPA_EPS = 1e-5
WTE = "transformer.wte.weight"
COMPILE_PREFIX = "_orig_mod."

# nanoGPT name (inside transformer.h.{i}.) -> timm name (inside blocks.{i}.)
_BLOCK_NAMES = {
    "ln_1": "norm1",
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")


def is_tiny_ijepa(obj: dict) -> bool:
    """True for ``{"model": nanoGPT-style state dict, "model_args": dict}``."""
    model = obj.get("model")
    if not isinstance(obj.get("model_args"), dict) or not isinstance(model, dict):
        return False
    return any(k.removeprefix(COMPILE_PREFIX) == WTE for k in model)


def convert_tiny_ijepa(model: dict, model_args: dict) -> tuple[dict, int]:
    """nanoGPT-style encoder tensors -> (timm ViT state dict, number of heads).

    Raises ``KeyError`` naming a missing ``model_args`` entry or tensor, ``ValueError`` for a
    patch embedding or position table of the wrong shape.
    """
    sd = {k.removeprefix(COMPILE_PREFIX): v for k, v in model.items()}
    for key in ("n_layer", "n_head", "n_embd", "patch_size"):
        if key not in model_args:
            raise KeyError(f"model_args.{key}")
    dim, p = int(model_args["n_embd"]), int(model_args["patch_size"])
    chans = int(model_args.get("in_chans", 3))
    wte = sd[WTE]
    if wte.shape not in ((dim, chans * p * p), (dim, chans, p, p)):
        raise ValueError(
            f"{WTE} has shape {tuple(wte.shape)}; expected ({dim}, {chans * p * p}) "
            f"for n_embd={dim}, in_chans={chans}, patch_size={p}"
        )
    zeros = torch.zeros(dim, dtype=wte.dtype)
    out = {
        "patch_embed.proj.weight": wte.reshape(dim, chans, p, p),
        "patch_embed.proj.bias": sd.get("transformer.wte.bias", zeros),
        "pos_embed": sd["transformer.wpe.weight"].unsqueeze(0),
        "norm.weight": sd["transformer.ln_f.weight"],
        "norm.bias": sd.get("transformer.ln_f.bias", zeros),
    }
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in _BLOCK_NAMES:
            out[f"blocks.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"] = value
    for i in range(int(model_args["n_layer"])):  # bias=False: zero biases, same function
        for name in _BLOCK_NAMES.values():
            weight = out.get(f"blocks.{i}.{name}.weight")
            if weight is None:
                raise KeyError(f"transformer.h.{i} ({name})")
            out.setdefault(f"blocks.{i}.{name}.bias", torch.zeros(weight.shape[0], dtype=wte.dtype))
    return out, int(model_args["n_head"])
