"""This toolkit's own checkpoints, recognised by the run config they carry (``config``).

- pretraining (``pretrain/train.py``): the official I-JEPA layout (``encoder``, ``predictor``,
  ``target_encoder`` with ``module.`` prefixes, ``opt``, ``epoch``, ...) plus ``config``, the
  resolved run config; its ``model`` section names the size (``model_name``) and the ``arch``
  fields that override it, so the head count (of the encoder and of the predictor) is known;
- finetuning (``finetune/run.py``): ``{"model", "epoch", "metrics", "config"}``; ``model`` is
  the encoder plus the classification ``head.*``; the head count is the ``model`` section's
  ``num_heads`` or ``arch.num_heads`` when the config sets one (else the standard table).
"""

from __future__ import annotations

from typing import Optional

from ..io.read import RawCheckpoint
from ..models.vit import MODEL_SIZES
from .canonical import SINGLE, SUBMODELS, Contents, epoch_of, is_tensor_dict, scalars_of

NAME = "toolkit"
DESCRIPTION = "this toolkit's checkpoint, with its run config"
PARTS = (*SUBMODELS, "predictor")


def _model_section(obj: dict) -> Optional[dict]:
    config = obj.get("config")
    section = config.get("model") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else None


def matches(raw: RawCheckpoint) -> bool:
    """Weights in the I-JEPA or the ``{"model": ...}`` layout, and a config with a model section."""
    obj = raw.obj
    weights = any(is_tensor_dict(obj.get(k)) for k in (*PARTS, "model"))
    return raw.container == "torch" and weights and _model_section(obj) is not None


def read(raw: RawCheckpoint) -> Contents:
    obj = raw.obj
    section = _model_section(obj)
    arch = section.get("arch") if isinstance(section.get("arch"), dict) else {}
    if is_tensor_dict(obj.get("model")):
        encoders, predictor, keys = {SINGLE: obj["model"]}, None, ("model",)
    else:
        encoders = {k: obj[k] for k in SUBMODELS if is_tensor_dict(obj.get(k))}
        predictor = obj["predictor"] if is_tensor_dict(obj.get("predictor")) else None
        keys = PARTS
    other = [k for k in obj if not (k in keys and is_tensor_dict(obj[k]))]
    eps = arch.get("layernorm_eps")
    return Contents(
        path=raw.path, format=NAME, encoders=encoders, predictor=predictor,
        epoch=epoch_of(obj), num_heads=_num_heads(section, arch),
        layernorm_eps=float(eps) if eps is not None else None,
        other_keys=other, meta=scalars_of(obj, other), **_pos_provenance(section, encoders),
        variant=_variant(section), predictor_variant=_predictor_variant(section),
    )  # fmt: skip


def _pos_provenance(section: dict, encoders: dict) -> dict:
    """Pretraining records its table kind: ``model.pos_embed`` (default ``sincos``, frozen);
    a finetuning config (the ``model`` layout) does not say it."""
    kind = section.get("pos_embed", "sincos")
    if SINGLE in encoders or kind not in ("sincos", "learned"):
        return {}
    return {"pos_kind": kind, "pos_source": f"toolkit pretraining config model.pos_embed={kind}"}


def _variant(section: dict) -> dict:
    """``model.mlp_act`` of a pretraining config, which no tensor shows (``{}``: exact GELU)."""
    act = section.get("mlp_act", "gelu")
    return {} if act == "gelu" else {"mlp_act": act}


def _predictor_variant(section: dict) -> dict:
    """What no predictor tensor shows: ``model.pred_num_heads`` (0 / absent: the encoder's),
    ``model.pred_mlp_act`` (absent: exact GELU), ``model.pred_layernorm_eps`` (absent: 1e-6)."""
    found = {}
    if section.get("pred_num_heads"):
        found["num_heads"] = int(section["pred_num_heads"])
    if section.get("pred_mlp_act") is not None:
        found["mlp_act"] = section["pred_mlp_act"]
    if section.get("pred_layernorm_eps") is not None:
        found["layernorm_eps"] = float(section["pred_layernorm_eps"])
    return found


def _num_heads(section: dict, arch: dict) -> Optional[int]:
    """Heads as the run built the encoder: ``arch.num_heads``, ``num_heads``, the named size."""
    for heads in (arch.get("num_heads"), section.get("num_heads")):
        if heads is not None:
            return int(heads)
    name = section.get("model_name")
    return MODEL_SIZES[name][2] if name in MODEL_SIZES else None
