"""Loading builds on the meta device and assigns the file's tensors: nothing left on meta, the
same outputs as the random-init-then-copy path, for every encoder kind (timing: bench/load.py)."""

from __future__ import annotations

import pytest
import torch

from ijepa_toolkit import save_checkpoint
from ijepa_toolkit.formats import contents_of
from ijepa_toolkit.formats.canonical import encoder_of
from ijepa_toolkit.io.read import read_raw
from ijepa_toolkit.loader import build_encoder, load_encoder_and_source
from ijepa_toolkit.models.vit import EncoderArch, create_encoder
from ijepa_toolkit.models.vit_variants import create_variant_encoder

ARCH = EncoderArch(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
KINDS = {
    "sincos": lambda: create_encoder(ARCH),
    "learned": lambda: create_encoder(ARCH, pos_embed_kind="learned"),
    "dyntanh": lambda: create_encoder(EncoderArch(**{**ARCH.to_dict(), "norm": "dyntanh"})),
    "rope+registers": lambda: create_variant_encoder(ARCH, "rope", 2),
    "factorized": lambda: create_variant_encoder(ARCH, "factorized"),
    "sincos+registers": lambda: create_variant_encoder(ARCH, "sincos", 1),
    "diffmoe": lambda: create_variant_encoder(ARCH, "rope", moe_experts=2),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@torch.no_grad()
def test_meta_build_assigns_every_tensor_and_computes_the_same(tmp_path, kind):
    torch.manual_seed(0)
    enc = KINDS[kind]().eval()
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"target_encoder": enc.state_dict(), "epoch": 1}, path)
    canonical = encoder_of(contents_of(read_raw(path)), "target_encoder", num_heads=2)
    fast, loaded = load_encoder_and_source(path, num_heads=2)
    slow = build_encoder(canonical, empty_init=False)
    for model in (fast, slow):
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and not any(t.is_meta for t in tensors)
        assert all(t.dtype == ref.dtype for t, ref in zip(tensors, enc.parameters()))
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    for images in (x[..., :16], x[..., :12]):  # another grid too (within factorised tables)
        assert torch.equal(fast.forward_features(images), slow.forward_features(images))
        assert torch.equal(fast.forward_features(images), enc.forward_features(images))
    if kind != "diffmoe":  # DiffMoE keeps statistics outside its state dict: built on the CPU
        qkv = fast.blocks[0].attn.qkv.weight
        assert (
            qkv.untyped_storage().data_ptr()
            == loaded.state_dict["blocks.0.attn.qkv.weight"].untyped_storage().data_ptr()
        )  # assigned, not copied: one copy in memory
