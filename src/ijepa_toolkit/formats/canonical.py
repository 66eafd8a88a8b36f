"""The canonical form every source format converts to, and the one conversion into it.

A format module (``formats/<source>.py``) reads a file's dict into ``Contents``: where the
encoder(s) and predictor are, with timm names, and what the file itself says about the
architecture (heads, LayerNorm eps). ``encoder_of`` turns ``Contents`` into ``Canonical``: one
encoder's prefix-free timm state dict, its ``EncoderArch``, its ``VariantViT`` options, the
position kind, which sub-model, the format and the epoch. The loader builds from ``Canonical``
only. This module is the form, not a format: format modules import it, it imports no format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import CheckpointError, UserError
from ..models.pos_embed import DRIFT_ATOL, EXACT_ATOL, sincos_distance
from ..models.predictor import PredictorArch, infer_predictor_arch
from ..models.vit import EncoderArch, infer_encoder_arch
from ..models.vit_variants import is_variant_state, variant_from_state

SUBMODELS = ("target_encoder", "encoder")  # the encoders of an I-JEPA training checkpoint
SINGLE = "model"  # the one encoder of every other format
ENCODER_ANCHOR = "patch_embed.proj.weight"
PREDICTOR_ANCHOR = "predictor_embed.weight"


@dataclass
class Contents:
    """What a format found in a file: weights (timm names, prefixes allowed) and arch hints.

    ``encoders``: ``target_encoder`` / ``encoder`` (I-JEPA layouts) or ``model`` -> tensors;
    ``num_heads`` / ``layernorm_eps``: when the file records them (else inferred / 1e-6);
    ``ignored``: tensors of the file that a name conversion left out; ``other_keys``: top-level
    keys beside the weights (``ijepa-inspect`` lists them); ``pos_kind`` / ``pos_source``: the
    position-table kind the file's provenance gives (``sincos`` / ``learned``) and why, when the
    format knows how the file was trained (None: unknown, decided numerically); ``variant``:
    ``VariantViT`` options the file's provenance gives and no tensor shows (``mlp_act``);
    ``predictor_variant``: the same for the predictor (``num_heads``, ``mlp_act``,
    ``layernorm_eps``).
    """

    path: Path
    format: str
    encoders: dict
    predictor: Optional[dict] = None
    epoch: Optional[int] = None
    num_heads: Optional[int] = None
    layernorm_eps: Optional[float] = None
    ignored: list = field(default_factory=list)
    other_keys: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    pos_kind: Optional[str] = None
    pos_source: str = ""
    variant: dict = field(default_factory=dict)
    predictor_variant: dict = field(default_factory=dict)


@dataclass
class Canonical:
    """One encoder ready to build: prefix-free timm state dict (no ``head.*``) + architecture.

    ``variant``: ``VariantViT`` options (``create_variant_encoder`` keywords besides ``pos_kind``)
    or None for a plain ``IJEPAVisionTransformer``; ``pos_kind``: ``sincos`` / ``learned`` (how a
    stored table extends to other grids), ``factorized`` or ``rope``; ``pos_reason``: how that
    kind was decided (``table_kind``).
    """

    path: str
    format: str
    which: str
    state_dict: dict
    arch: EncoderArch
    variant: Optional[dict]
    pos_kind: str
    epoch: Optional[int] = None
    ignored: list = field(default_factory=list)
    pos_reason: str = ""


def is_tensor_dict(obj: Any) -> bool:
    """A non-empty dict whose values are all tensors (a state dict)."""
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def epoch_of(obj: dict) -> Optional[int]:
    """The integer ``epoch`` entry of a checkpoint dict (a 0-d integer tensor too), else None."""
    epoch = obj.get("epoch")
    if torch.is_tensor(epoch) and epoch.numel() == 1 and not epoch.is_floating_point():
        epoch = int(epoch)
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def scalars_of(obj: dict, keys: list) -> dict:
    """The plain scalar values among ``obj[keys]`` (for the inspect summary)."""
    return {k: obj[k] for k in keys if isinstance(obj[k], (bool, int, float, str))}


def strip_to_anchor(state_dict: dict, anchor: str, path: Any, what: str) -> tuple[dict, list]:
    """Keys under the one prefix that holds ``anchor`` (e.g. ``module.``), prefix removed;
    and the keys outside it."""
    prefixes = sorted({k[: -len(anchor)] for k in state_dict if k.endswith(anchor)})
    if not prefixes:
        keys = ", ".join(list(state_dict)[:6]) + (", ..." if len(state_dict) > 6 else "")
        raise CheckpointError(
            f"{path}: no {what} weights found (no key ending in '{anchor}'; keys: {keys})"
        )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{path}: several {what}s found under prefixes {prefixes}; keep one in the file"
        )
    prefix = prefixes[0]
    inside = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return inside, [k for k in state_dict if not k.startswith(prefix)]


def check_which(which: Optional[str]) -> str:
    """``which`` validated (None -> ``target_encoder``)."""
    which = which or "target_encoder"
    if which not in SUBMODELS:
        raise UserError(f"which={which!r}; expected one of {SUBMODELS}")
    return which


def encoder_of(contents: Contents, which: str, num_heads: Optional[int] = None) -> Canonical:
    """The canonical form of the encoder ``which`` (ignored by single-encoder formats).

    ``num_heads`` overrides what the file records; raises ``CheckpointError`` naming the file.
    """
    path = contents.path
    if SINGLE in contents.encoders:
        which = SINGLE
    elif which not in contents.encoders:
        present = list(contents.encoders) or "none"
        raise CheckpointError(f"{path}: has no '{which}' weights (sub-models present: {present})")
    state, outside = strip_to_anchor(contents.encoders[which], ENCODER_ANCHOR, path, "encoder")
    head = [k for k in state if k.startswith("head.")]
    for k in head:
        del state[k]
    heads = num_heads if num_heads is not None else contents.num_heads
    arch, variant, pos_kind, reason = or_checkpoint_error(
        infer_encoder, path, state, heads, contents
    )
    if contents.layernorm_eps is not None:
        arch.layernorm_eps = contents.layernorm_eps
    if contents.variant:
        variant = {**(variant or {}), **contents.variant}
    ignored = contents.ignored + outside + head
    return Canonical(
        str(path), contents.format, which, state, arch, variant, pos_kind, contents.epoch, ignored,
        reason,
    )  # fmt: skip


def infer_encoder(
    state: dict, num_heads: Optional[int], contents: Optional[Contents] = None
) -> tuple[EncoderArch, Optional[dict], str, str]:
    """``(arch, variant options or None, position kind, why that kind)`` off prefix-free timm
    tensors (``contents``: the file's provenance, see ``table_kind``).

    Raises the models' ``KeyError`` (a missing tensor) / ``ValueError`` (unusable shapes).
    """
    if is_variant_state(state):
        arch, options = variant_from_state(state, num_heads, "sincos")
        pos_kind = options.pop("pos_kind")
        if pos_kind != "sincos":
            return arch, options, pos_kind, f"structure: {pos_kind} position tensors"
        return arch, options, *table_kind(state, arch, contents)  # a stored table: which kind
    arch = infer_encoder_arch(state, num_heads)
    return arch, None, *table_kind(state, arch, contents)


def table_kind(state: dict, arch: EncoderArch, contents: Optional[Contents]) -> tuple[str, str]:
    """``(sincos | learned, reason)`` for the stored ``pos_embed``: provenance first.

    A format that knows how the file was trained gives the kind (``Contents.pos_kind``); for
    ``sincos`` the context encoder's table, which no optimizer and no EMA touches, is checked to
    be the formula exactly (``EXACT_ATOL``) when the file has it. Only without provenance is the
    table itself compared with the formula, to ``DRIFT_ATOL`` (the float32 EMA drift of released
    target tables, ``models/pos_embed.py``).
    """
    if "pos_embed" not in state:
        return "sincos", "no stored table"
    grid = (arch.img_size // arch.patch_size,) * 2
    known = contents.pos_kind if contents is not None else None
    if known == "sincos":
        context = _context_table(contents)
        if context is None:
            return "sincos", f"provenance: {contents.pos_source}"
        dist = sincos_distance(context, grid)
        if dist <= EXACT_ATOL:
            return "sincos", (
                f"provenance: {contents.pos_source}; the context encoder's table is the formula "
                f"(max diff {dist:.2g})"
            )
        return "learned", (
            f"evidence: the context encoder's table differs from sin-cos by {dist:.3g}, so it "
            f"was trained (despite {contents.pos_source})"
        )
    if known is not None:
        return known, f"provenance: {contents.pos_source}"
    dist = sincos_distance(state["pos_embed"], grid)
    kind, rel = ("sincos", "<=") if dist <= DRIFT_ATOL else ("learned", ">")
    return (
        kind,
        f"numeric (provenance unknown): max |table - sin-cos| {dist:.3g} {rel} {DRIFT_ATOL:g}",
    )


def _context_table(contents: Contents) -> Optional[torch.Tensor]:
    """The context encoder's ``pos_embed`` in an I-JEPA layout, or None."""
    context = contents.encoders.get("encoder")
    if not context or not any(k.endswith(ENCODER_ANCHOR) for k in context):
        return None
    return strip_to_anchor(context, ENCODER_ANCHOR, contents.path, "encoder")[0].get("pos_embed")


def predictor_of(contents: Contents, num_heads: Optional[int] = None) -> tuple[dict, PredictorArch]:
    """The predictor's prefix-free state dict and architecture (I-JEPA layouts only); heads:
    ``num_heads``, else the file's predictor heads, else the file's (encoder) heads."""
    if contents.predictor is None:
        raise CheckpointError(
            f"{contents.path}: has no 'predictor' weights (format {contents.format}); "
            "only I-JEPA training checkpoints carry the predictor"
        )
    state = strip_to_anchor(contents.predictor, PREDICTOR_ANCHOR, contents.path, "predictor")[0]
    recorded = contents.predictor_variant
    heads = num_heads if num_heads is not None else recorded.get("num_heads", contents.num_heads)
    arch = or_checkpoint_error(infer_predictor_arch, contents.path, state, heads)
    arch.mlp_act = recorded.get("mlp_act", arch.mlp_act)
    arch.layernorm_eps = recorded.get("layernorm_eps", arch.layernorm_eps)
    return state, arch


def or_checkpoint_error(infer: Callable, path: Any, *args: Any) -> Any:
    """``infer(*args)`` with the models' ``KeyError`` / ``ValueError`` as ``CheckpointError``."""
    try:
        return infer(*args)
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete weights, missing key {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
