"""Export an I-JEPA encoder (``ijepa-export``) for plain timm or Hugging Face transformers.

- ``timm`` (default): one safetensors file with the chosen encoder only (the slim file of a
  multi-GB training checkpoint) and a JSON spec beside it: ``timm.create_model(spec[
  "architecture"], pretrained=True, pretrained_cfg_overlay=dict(spec["pretrained_cfg_overlay"],
  file=weights), **spec["kwargs"])`` rebuilds the encoder offline. A finetuned classifier keeps
  its linear head (``head.*``, a BatchNorm before it folded in; ``num_classes`` in the spec).
- ``hf``: a folder with ``config.json`` and ``model.safetensors`` that
  ``transformers.IJepaModel.from_pretrained(folder)`` loads (written with safetensors and json;
  transformers is not needed to export).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import CheckpointError, UserError
from .io.atomic import atomic_write, write_json

if TYPE_CHECKING:  # the loading stack (torch, timm) is imported when an export runs
    from .io.read import PathLike
    from .models.vit import EncoderArch

EXPORT_FORMATS = ("timm", "hf")
# Timm model names whose defaults match the official I-JEPA releases.
TIMM_NAMES = {
    (1280, 32, 14): "vit_huge_patch14_gap_224",
    (1280, 32, 16): "vit_huge_patch16_gap_448",
    (1408, 40, 16): "vit_giant_patch16_gap_224",
    (768, 12, 16): "vit_base_patch16_gap_224",
}


def timm_spec(arch: EncoderArch, num_classes: int = 0) -> dict:
    """``{"architecture", "kwargs", "pretrained_cfg_overlay"}`` for plain ``timm.create_model``.

    ``pretrained_cfg_overlay`` (add ``file=...``) makes timm report the right input size and
    normalisation and load the weights with strict key matching. ``num_classes``: 0 for an
    encoder, the head's classes for a classifier. Raises ``UserError`` for an encoder plain timm
    cannot build (DynTanh, eps != 1e-6).
    """
    if "dyntanh" in (arch.norm, arch.block_norm):
        raise UserError("a DynTanh encoder has no plain timm equivalent (timm uses LayerNorm)")
    if arch.layernorm_eps != 1e-6:
        raise UserError(
            f"timm's ViT uses LayerNorm eps 1e-6; this encoder has {arch.layernorm_eps}"
        )
    name = TIMM_NAMES.get((arch.embed_dim, arch.depth, arch.patch_size), "vit_base_patch16_gap_224")
    kwargs = dict(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
        embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias, class_token=False,
        global_pool="avg", fc_norm=False, num_classes=num_classes,
    )  # fmt: skip
    overlay = dict(
        input_size=(arch.in_chans, arch.img_size, arch.img_size), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, num_classes=num_classes,
    )  # fmt: skip
    return {"architecture": name, "kwargs": kwargs, "pretrained_cfg_overlay": overlay}


def export_encoder(
    path: PathLike,
    out: PathLike,
    which: str = "target_encoder",
    num_heads: Optional[int] = None,
    fmt: Literal["timm", "hf"] = "timm",
) -> dict:
    """Write the chosen encoder of ``path`` in the format ``fmt``; returns the spec / config.

    ``timm``: ``out`` (safetensors) plus ``out`` with a ``.json`` suffix (the spec);
    ``hf``: the folder ``out`` with ``config.json`` and ``model.safetensors`` (the config).
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export format {fmt!r}; expected one of {EXPORT_FORMATS}")
    from .io.save import record_sha256, sidecar
    from .loader import load_encoder_and_source

    out = Path(out)
    if fmt == "timm" and out.suffix == ".json":
        raise UserError(f"{out}: the weights file needs a suffix other than .json (the spec's)")
    model, loaded = load_encoder_and_source(path, which, num_heads)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "source": str(path), "which": loaded.which}
    try:
        if fmt == "hf":
            return _write_hf(model.arch, loaded.variant, tensors, out, metadata)
        if getattr(model, "mlp_act", "gelu") != "gelu":  # no tensor shows it: it would be lost
            raise UserError(
                f"the encoder's MLPs use {model.mlp_act}, which an export cannot record"
            )
        head = _classifier_head(path, model.embed_dim) if _has_head(loaded.ignored) else {}
        classes = head["head.weight"].shape[0] if head else 0
        spec = timm_spec(model.arch, classes)
    except UserError as e:
        raise CheckpointError(f"{path}: {e}") from None
    sidecar(out).unlink(missing_ok=True)  # never beside another file's weights
    _save_safetensors({**tensors, **head}, out, dict(metadata, source_format=loaded.format))
    record_sha256(out)  # <out>.sha256, verified when the file is read
    write_json(spec, out.with_suffix(".json"), "export spec")
    return spec


def _save_safetensors(tensors: dict, out: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    with atomic_write(out, "safetensors export") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _write_hf(
    arch: EncoderArch, variant: Optional[dict], tensors: dict, out: Path, metadata: dict
) -> dict:
    """``config.json`` + ``model.safetensors`` of the equivalent ``IJepaModel`` in ``out``."""
    from .formats import hf

    if variant is not None or "dyntanh" in (arch.norm, arch.block_norm):
        raise UserError("only plain ViT encoders (LayerNorm, a position table) have an IJepaModel")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (--format hf writes a folder)")
    out.mkdir(parents=True, exist_ok=True)
    config = hf.hf_config(arch)
    _save_safetensors(hf.timm_to_hf(tensors), out / hf.WEIGHT_FILES[0], metadata)
    write_json(config, out / hf.CONFIG_FILE, "transformers config")
    return config


def _has_head(ignored: list) -> bool:
    return any(k.startswith("head.") for k in ignored)


def _classifier_head(path: PathLike, width: int) -> dict:
    """timm's ``head.{weight,bias}`` from a finetuned classifier's ``head.linear`` (a
    ``BatchNorm1d(affine=False)`` before it folded in); ``UserError`` for a concat4 head."""
    from .formats import contents_of, locate
    from .formats.canonical import SINGLE
    from .io.read import read_raw
    from .models.heads import HEAD_BN_EPS

    model = contents_of(read_raw(locate(path))).encoders.get(SINGLE, {})
    weight, bias = model["head.linear.weight"].double(), model["head.linear.bias"].double()
    if weight.shape[1] != width:
        raise UserError(
            f"the head reads {weight.shape[1]} features, not the {width} of average pooling "
            "(a concat4 head); plain timm pools only the final tokens"
        )
    if "head.norm.running_mean" in model:
        scale = (model["head.norm.running_var"].double() + HEAD_BN_EPS).rsqrt()
        bias = bias - weight @ (model["head.norm.running_mean"].double() * scale)
        weight = weight * scale
    dtype = model["head.linear.weight"].dtype
    return {"head.weight": weight.to(dtype), "head.bias": bias.to(dtype)}
