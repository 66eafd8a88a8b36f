"""The official I-JEPA training checkpoint (facebookresearch/ijepa ``src/train.py``).

``{"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size",
"world_size", "lr"}``; the three state dicts carry DDP's ``module.`` prefix. The encoders use
timm's ViT names already. StoP (amirbar/StoP ``main.py``) saves exactly the same keys and
tensors (its stochastic positions change the predictor's forward, not its weights: pass
``stop_sigma`` to ``load_predictor``), so StoP files are read by this module; there is no
separate StoP format. The width does not say the head count for non-standard widths: pass
``num_heads``.

Both codes build the encoders' ``pos_embed`` as a frozen sin-cos table (``requires_grad=False``),
so in a file with the whole official save (the three sub-models) the position kind comes from
this provenance (``Contents.pos_kind``), not from the target table, which the EMA's float32
rounding moves (``models/pos_embed.py``); the context encoder's table, exact, is checked as
evidence (``canonical.table_kind``). Partial files are decided numerically.
"""

from __future__ import annotations

from ..io.read import RawCheckpoint
from .canonical import SUBMODELS, Contents, epoch_of, is_tensor_dict, scalars_of

NAME = "ijepa"
DESCRIPTION = "I-JEPA training checkpoint"
PARTS = (*SUBMODELS, "predictor")
PROVENANCE = "official I-JEPA/StoP layout, trained with a frozen sin-cos table"


def matches(raw: RawCheckpoint) -> bool:
    """Any of ``target_encoder`` / ``encoder`` / ``predictor`` is a state dict."""
    return raw.container == "torch" and any(is_tensor_dict(raw.obj.get(k)) for k in PARTS)


def read(raw: RawCheckpoint) -> Contents:
    obj = raw.obj
    other = [k for k in obj if not (k in PARTS and is_tensor_dict(obj[k]))]
    predictor = obj["predictor"] if is_tensor_dict(obj.get("predictor")) else None
    return Contents(
        path=raw.path, format=NAME, predictor=predictor, epoch=epoch_of(obj),
        encoders={k: obj[k] for k in SUBMODELS if is_tensor_dict(obj.get(k))},
        other_keys=other, meta=scalars_of(obj, other), **_pos_provenance(obj),
    )  # fmt: skip


def _pos_provenance(obj: dict) -> dict:
    if not all(is_tensor_dict(obj.get(k)) for k in PARTS):
        return {}
    return {"pos_kind": "sincos", "pos_source": PROVENANCE}
