"""The one-way loader: read safely -> recognise the format -> canonical form -> build -> load.

``io.read`` reads the file (``weights_only=True`` or safetensors); ``formats.recognise`` picks
the one format module that reads it into ``Contents``; ``formats.canonical.encoder_of`` converts
that into a ``Canonical`` encoder (timm state dict + ``EncoderArch``); this module builds the
timm model and loads the weights strictly (key set, shapes, finite values). ``inspect_checkpoint``
uses the same reading and recognition, without building anything.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable, Optional, Union

import torch

from .errors import CheckpointError, UserError
from .formats import contents_of, locate
from .formats.canonical import (
    ENCODER_ANCHOR,
    PREDICTOR_ANCHOR,
    Canonical,
    Contents,
    check_which,
    encoder_of,
    infer_encoder,
    predictor_of,
    strip_to_anchor,
)
from .io.read import PathLike, read_raw, verify_records
from .models.predictor import IJEPAPredictor, TargetInput, infer_predictor_arch
from .models.vit import POS_EMBED_KINDS, EncoderArch, IJEPAVisionTransformer, create_encoder
from .models.vit_variants import create_variant_encoder

logger = logging.getLogger("ijepa_toolkit")
POS_EMBED_CHOICES = ("auto", *POS_EMBED_KINDS)


def load_encoder(
    path: PathLike,
    which: str = "target_encoder",
    num_heads: Optional[int] = None,
    pos_embed: str = "auto",
    drop_path_rate: float = 0.0,
) -> IJEPAVisionTransformer:
    """Load an I-JEPA encoder as a timm ``VisionTransformer`` in eval mode.

    ``which``: ``target_encoder`` (the EMA encoder the I-JEPA paper evaluates; default) or
    ``encoder`` (the context encoder) for I-JEPA checkpoints; ignored for single-model files.
    ``num_heads``: needed only for non-standard widths in files that do not record it (this
    toolkit's checkpoints and ``ijepa-export`` output record it). ``pos_embed``: ``auto``
    decides whether the stored table is the fixed sin-cos one, from the file's provenance first
    (official/StoP layout, toolkit pretraining), else numerically (``formats.canonical.table_kind``;
    ``canonical.pos_reason`` says which); ``sincos``/``learned`` force how it extends to other
    input sizes. ``drop_path_rate``: stochastic depth, 0 -> rate linearly
    over the blocks (timm's rule; active in train mode only). ``model.forward_features(x)``
    gives (B, N, D) tokens after the final norm, ``model(x)`` their mean (B, D).
    """
    return load_encoder_and_source(path, which, num_heads, pos_embed, drop_path_rate)[0]


def load_encoder_and_source(
    path: PathLike,
    which: str = "target_encoder",
    num_heads: Optional[int] = None,
    pos_embed: str = "auto",
    drop_path_rate: float = 0.0,
) -> tuple[IJEPAVisionTransformer, Canonical]:
    """``load_encoder``'s model and the ``Canonical`` encoder it was built from."""
    which = check_which(which)
    if pos_embed not in POS_EMBED_CHOICES:
        raise UserError(f"pos_embed must be 'auto' or one of {POS_EMBED_KINDS}, got {pos_embed!r}")
    raw = read_raw(locate(path))
    canonical = encoder_of(contents_of(raw), which, num_heads)
    verify_records(raw, canonical.state_dict.values())
    model = build_encoder(canonical, pos_embed, drop_path_rate)
    ignored = f", ignored {len(canonical.ignored)} other tensors" if canonical.ignored else ""
    logger.info(
        "loaded %s from %s: format=%s, %s, pos_embed=%s (%s), epoch=%s%s",
        canonical.which, path, canonical.format, describe_arch(model.arch), model.pos_embed_kind,
        canonical.pos_reason.split(":")[0], canonical.epoch, ignored,
    )  # fmt: skip
    return model, canonical


def build_encoder(
    canonical: Canonical,
    pos_embed: str = "auto",
    drop_path_rate: float = 0.0,
    empty_init: bool = True,
) -> IJEPAVisionTransformer:
    """The timm encoder of ``canonical`` holding exactly its weights, in eval mode.

    ``pos_embed`` (``sincos`` / ``learned``) overrides the detected kind of a stored table.
    ``empty_init``: build on the meta device (no random init, no memory) and assign the loaded
    tensors as the parameters: one copy in memory (for a memory-mapped checkpoint, its pages).
    Models holding tensors outside their state dict (DiffMoE's statistics) are built on the
    CPU and initialised as before (``empty_init=False``: always; ``bench/load.py`` compares).
    """
    check_finite(canonical.state_dict, canonical.path)
    kind = canonical.pos_kind
    if pos_embed != "auto" and kind in POS_EMBED_KINDS:
        kind = pos_embed

    def create() -> IJEPAVisionTransformer:
        if canonical.variant is None:
            return create_encoder(canonical.arch, kind, drop_path_rate=drop_path_rate)
        return create_variant_encoder(
            canonical.arch, pos_kind=kind, drop_path_rate=drop_path_rate, **canonical.variant
        )

    model = _create_on_meta(create) if empty_init else None
    assign = model is not None
    model = model or create()
    load_strict(model, canonical.state_dict, canonical.path, assign=assign)
    return model.eval()


def _create_on_meta(create: Callable[[], torch.nn.Module]) -> Optional[torch.nn.Module]:
    """``create()`` on the meta device, or None when a tensor outside the state dict (which
    loading cannot fill) would be left on it."""
    with torch.device("meta"):
        model = create()
    for module in model.modules():
        if any(torch.is_tensor(v) and v.is_meta for v in vars(module).values()):
            return None
    return model


def check_finite(state_dict: dict, path: Any) -> None:
    """``CheckpointError`` naming the first floating-point tensor that holds NaN or inf.

    A finite sum proves every entry finite (inf and NaN propagate through a sum) at a fraction
    of ``isfinite``'s cost; only a non-finite sum (a bad entry, or an overflow) looks closer.
    """
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t.sum())):
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{path}: tensor '{name}' holds NaN or inf values")


def load_strict(model: torch.nn.Module, state_dict: dict, path: Any, assign: bool = False) -> None:
    """Load ``state_dict`` only if its keys and shapes are exactly the model's; else list the
    missing, unexpected and wrong-shape tensors (5 of each) in one ``CheckpointError``.

    ``assign``: the tensors become the parameters (cast to the model's dtype where it differs),
    as ``load_state_dict(assign=True)``; for a model built on the meta device.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{label}: {', '.join(keys[:5])}{more}")
    if parts:
        raise CheckpointError(f"{path}: weights do not match the model; " + "; ".join(parts))
    if assign:
        state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: tensors left on the meta device after loading: {left[:5]}")


def describe_arch(arch: EncoderArch) -> str:
    """One-line summary of an encoder architecture (the loader's log line)."""
    grid = arch.img_size // arch.patch_size
    return (
        f"ViT depth={arch.depth} width={arch.embed_dim} heads={arch.num_heads} "
        f"patch={arch.patch_size} mlp_ratio={arch.mlp_ratio:.4g} grid={grid}x{grid}"
    )


def load_predictor(
    path: PathLike,
    num_heads: Optional[int] = None,
    stop_sigma: float = 0.0,
    target_input: Optional[TargetInput] = None,
) -> IJEPAPredictor:
    """The official predictor of an I-JEPA checkpoint, in eval mode.

    Called as ``predictor(context_tokens, masks_x, masks, generator=None)``. Heads default to
    what the file records (this toolkit's pretraining), else the standard head count of the
    encoder width (as the official code builds it); pass ``num_heads`` otherwise. A StoP
    checkpoint has the same tensors; ``stop_sigma`` gives StoP's forward (``target_input``
    ``stop_noise``: target tokens get ``position + predictor_embed(noise)``, drawn in eval mode
    too; StoP's configs use 0.25 for ViT-B/16 and ViT-L/16, 0.2 for ViT-H/16);
    ``target_input="stop_zero_noise"`` is that forward with zero noise (deterministic).
    ``predictor.settings`` records the mode and sigma (``models/predictor.py``).
    """
    raw = read_raw(locate(path))
    state, arch = predictor_of(contents_of(raw), num_heads)
    verify_records(raw, state.values())
    check_finite(state, path)
    model = IJEPAPredictor(arch, stop_sigma=stop_sigma, target_input=target_input)
    load_strict(model, state, path)
    logger.info(
        "loaded predictor from %s: depth=%d width=%d heads=%d grid=%dx%d target_input=%s "
        "stop_sigma=%g",
        path, arch.depth, arch.predictor_embed_dim, arch.num_heads, arch.grid, arch.grid,
        model.settings["target_input"], model.settings["stop_sigma"],
    )  # fmt: skip
    return model.eval()


def inspect_checkpoint(path: PathLike) -> dict:
    """What a checkpoint holds, read on the CPU without building a model.

    ``{"path", "format", "epoch", "submodels": {name: {"tensors", "params", "arch",
    "pos_embed", "pos_embed_reason"}}, "other_keys", "meta"}``; ``arch["num_heads"]`` is None
    when neither the width nor the file says it.
    """
    raw = read_raw(locate(path))
    contents = contents_of(raw)
    info: dict = {"path": str(path), "format": contents.format, "epoch": contents.epoch}
    info["submodels"] = {
        name: _encoder_entry(sd, contents, path) for name, sd in contents.encoders.items()
    }
    if contents.predictor is not None:
        heads = contents.predictor_variant.get("num_heads", contents.num_heads)
        info["submodels"]["predictor"] = _predictor_entry(contents.predictor, heads, path)
    info["other_keys"], info["meta"] = contents.other_keys, contents.meta
    if not any("arch" in e for e in info["submodels"].values()):
        keys = ", ".join(map(str, list(raw.obj)[:6])) + (", ..." if len(raw.obj) > 6 else "")
        raise CheckpointError(
            f"{path}: no encoder weights found (no key ending in '{ENCODER_ANCHOR}'; keys: {keys})"
        )
    return info


def _sizes(sd: dict) -> dict:
    return {"tensors": len(sd), "params": int(sum(t.numel() for t in sd.values()))}


def _encoder_entry(sd: dict, contents: Contents, path: PathLike) -> dict:
    entry = _sizes(sd)
    if any(k.endswith(ENCODER_ANCHOR) for k in sd):
        state = strip_to_anchor(sd, ENCODER_ANCHOR, path, "encoder")[0]
        found = _infer_summary(partial(infer_encoder, contents=contents), state, contents.num_heads)
        if isinstance(found, str):
            entry["arch"] = found
        else:
            entry["arch"], (entry["pos_embed"], entry["pos_embed_reason"]) = found[0], found[1][2:]
            if contents.layernorm_eps is not None:
                entry["arch"]["layernorm_eps"] = contents.layernorm_eps
    return entry


def _predictor_entry(sd: dict, num_heads: Optional[int], path: PathLike) -> dict:
    entry = _sizes(sd)
    state = strip_to_anchor(sd, PREDICTOR_ANCHOR, path, "predictor")[0]
    found = _infer_summary(infer_predictor_arch, state, num_heads)
    entry["arch"] = found if isinstance(found, str) else found[0]
    return entry


def _infer_summary(
    infer: Callable, state: dict, num_heads: Optional[int]
) -> Union[str, tuple[dict, Any]]:
    """``(arch dict, what infer returned)``; ``num_heads`` None in the dict when the width does
    not say it; a string saying why when the tensors are unusable."""
    try:
        found, known = infer(state, num_heads), True
    except KeyError as e:
        return f"incomplete (missing {e})"
    except ValueError:
        try:
            found, known = infer(state, 1), False
        except (KeyError, ValueError) as e:
            return f"unrecognised ({e})"
    arch = (found[0] if isinstance(found, tuple) else found).to_dict()
    if not known:
        arch["num_heads"] = None
    return arch, found
