"""Export an I-JEPA encoder for plain timm: safetensors weights and a JSON spec (``ijepa-export``).

``timm.create_model(spec["architecture"], pretrained=True, pretrained_cfg_overlay=dict(
spec["pretrained_cfg_overlay"], file=weights), **spec["kwargs"])`` rebuilds the encoder offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .checkpoint import PathLike, atomic_target, load_encoder_and_source
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .engine.logger import write_json_atomic
from .models.vit import EncoderArch

# Timm model names whose defaults match the official I-JEPA releases.
TIMM_NAMES = {
    (1280, 32, 14): "vit_huge_patch14_gap_224",
    (1280, 32, 16): "vit_huge_patch16_gap_448",
    (1408, 40, 16): "vit_giant_patch16_gap_224",
    (768, 12, 16): "vit_base_patch16_gap_224",
}


def timm_spec(arch: EncoderArch) -> dict:
    """``{"architecture", "kwargs", "pretrained_cfg_overlay"}`` for plain ``timm.create_model``.

    ``pretrained_cfg_overlay`` (add ``file=...``) makes timm report the right input size and
    normalisation and load the weights with strict key matching (``num_classes=0``).
    """
    if "dyntanh" in (arch.norm, arch.block_norm):
        raise ValueError("a DynTanh encoder has no plain timm equivalent (timm uses LayerNorm)")
    if arch.layernorm_eps != 1e-6:
        raise ValueError(
            f"timm's ViT uses LayerNorm eps 1e-6; this encoder has {arch.layernorm_eps}"
        )
    name = TIMM_NAMES.get((arch.embed_dim, arch.depth, arch.patch_size), "vit_base_patch16_gap_224")
    kwargs = dict(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
        embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias, class_token=False,
        global_pool="avg", fc_norm=False, num_classes=0,
    )  # fmt: skip
    overlay = dict(
        input_size=(arch.in_chans, arch.img_size, arch.img_size), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, num_classes=0,
    )  # fmt: skip
    return {"architecture": name, "kwargs": kwargs, "pretrained_cfg_overlay": overlay}


def export_encoder(
    path: PathLike, out: PathLike, which: str = "target_encoder", num_heads: Optional[int] = None
) -> dict:
    """Write the chosen encoder as ``out`` (safetensors) and ``out`` with a ``.json`` suffix.

    Returns the JSON spec: ``timm.create_model(spec["architecture"], pretrained=True,
    pretrained_cfg_overlay=dict(spec["pretrained_cfg_overlay"], file=out), **spec["kwargs"])``
    rebuilds the encoder (``pretrained_cfg_overlay=dict(file=out)`` alone loads the same weights).
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix == ".json":
        raise ValueError(f"{out}: the weights file needs a suffix other than .json (the spec's)")
    model, loaded = load_encoder_and_source(path, which, num_heads, "auto")
    spec = timm_spec(model.arch)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"source": str(path), "format": loaded.format, "which": loaded.which}
    with atomic_target(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_json_atomic(spec, out.with_suffix(".json"))
    return spec
