"""tiny-IJEPA (nanoGPT-style) checkpoints load into the timm ViT and compute the same forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ijepa_toolkit import CheckpointError, load_encoder, save_checkpoint
from ijepa_toolkit.checkpoint import inspect_checkpoint

ARGS = dict(n_layer=2, n_head=4, n_embd=32, patch_size=4, in_chans=3, bias=True, dropout=0.0)
GRID = 4  # 16x16 images


def _nanogpt_state(args: dict, seed: int = 0, bias: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    d, p, c = args["n_embd"], args["patch_size"], args["in_chans"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"transformer.wte.weight": r(d, c * p * p), "transformer.wpe.weight": r(GRID**2, d)}
    sd["transformer.ln_f.weight"] = 1 + r(d)
    if bias:
        sd["transformer.wte.bias"] = r(d)
        sd["transformer.ln_f.bias"] = r(d)
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        shapes = {"ln_1": (d,), "attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "ln_2": (d,),
                  "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}  # fmt: skip
        for name, shape in shapes.items():
            sd[h + name + ".weight"] = (1 + r(d)) if name.startswith("ln") else r(*shape)
            if bias:
                sd[h + name + ".bias"] = r(shape[0])
    return sd


def _reference_forward(sd: dict, args: dict, x: torch.Tensor) -> torch.Tensor:
    """The tiny-IJEPA encoder written out from its description: (B, C, H, W) -> (B, N, D)."""
    d, p, nh = args["n_embd"], args["patch_size"], args["n_head"]
    b, c, hh, ww = x.shape
    patches = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, (hh // p) * (ww // p), c * p * p)  # (channel, row, col) order

    def lin(t, name):
        return F.linear(t, sd[name + ".weight"], sd.get(name + ".bias"))

    def ln(t, name):
        return F.layer_norm(t, (d,), sd[name + ".weight"], sd.get(name + ".bias"), eps=1e-5)

    t = lin(patches, "transformer.wte") + sd["transformer.wpe.weight"]
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        q, k, v = lin(ln(t, h + "ln_1"), h + "attn.c_attn").split(d, dim=2)
        q, k, v = (z.view(b, -1, nh, d // nh).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // nh), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, -1, d)
        t = t + lin(y, h + "attn.c_proj")
        m = F.gelu(lin(ln(t, h + "ln_2"), h + "mlp.c_fc"))
        t = t + lin(m, h + "mlp.c_proj")
    return ln(t, "transformer.ln_f")


@pytest.mark.parametrize("bias", [True, False])
def test_tiny_ijepa_parity(tmp_path, bias):
    args = dict(ARGS, bias=bias)
    sd = _nanogpt_state(args, bias=bias)
    path = tmp_path / "ckpt.pt"
    compiled = {f"_orig_mod.{k}": v for k, v in sd.items()}  # torch.compile prefix
    save_checkpoint({"model": compiled, "model_args": args, "iter_num": 7}, path)
    enc = load_encoder(path)
    assert enc.arch.layernorm_eps == 1e-5 and enc.pos_embed_kind == "learned"
    assert enc.arch.num_heads == 4 and not enc.training
    x = torch.randn(3, 3, 4 * GRID, 4 * GRID)
    with torch.no_grad():
        ours, ref = enc.forward_features(x), _reference_forward(sd, args, x)
        pooled = enc(x)
    assert ours.shape == (3, GRID**2, 32)
    assert (ours - ref).abs().max() < 1e-5
    assert (pooled - ref.mean(1)).abs().max() < 1e-5
    assert inspect_checkpoint(path)["format"] == "tiny_ijepa"


def test_tiny_ijepa_bad_file(tmp_path):
    args = {k: v for k, v in ARGS.items() if k != "n_head"}
    path = tmp_path / "bad.pt"
    save_checkpoint({"model": _nanogpt_state(ARGS), "model_args": args}, path)
    with pytest.raises(CheckpointError, match="model_args.n_head"):
        load_encoder(path)
