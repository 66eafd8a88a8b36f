"""Reading checkpoints safely, finding the encoder/predictor in them, atomic saving, inspecting.

Export to plain timm lives in ``export.py``.

Formats read:
- ``ijepa``: the official I-JEPA training checkpoint (``encoder``, ``predictor``,
  ``target_encoder``, ``opt``, ... with DDP ``module.`` prefixes); StoP and this toolkit's
  pretraining write the same layout.
- ``model``: ``{"model": state_dict, ...}`` (this toolkit's finetuning, MAE, DeiT) or
  ``{"state_dict": ...}``.
- ``state_dict``: a bare encoder state dict.
- ``safetensors``: this toolkit's exports (``ijepa-export``) or any safetensors encoder.
- ``tiny_ijepa``: ``{"model", "model_args"}`` with nanoGPT-style names (``models/tiny_ijepa.py``),
  converted to the timm names on load (LayerNorm eps 1e-5, learned positions).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .models.predictor import IJEPAPredictor, PredictorArch, infer_predictor_arch
from .models.tiny_ijepa import TINY_IJEPA_EPS, convert_tiny_ijepa, is_tiny_ijepa
from .models.vit import (
    POS_EMBED_KINDS,
    EncoderArch,
    IJEPAVisionTransformer,
    create_encoder,
    infer_encoder_arch,
    pos_embed_kind_of,
)
from .models.vit_variants import (
    VariantViT,
    create_variant_encoder,
    is_variant_state,
    variant_from_state,
)

logger = logging.getLogger("ijepa_toolkit")

PathLike = Union[str, os.PathLike]
SUBMODELS = ("target_encoder", "encoder")
ENCODER_ANCHOR = "patch_embed.proj.weight"
PREDICTOR_ANCHOR = "predictor_embed.weight"
SAFETENSORS_SUFFIXES = (".safetensors", ".st")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class LoadedState:
    """A state dict found in a checkpoint, with where it came from."""

    path: str
    format: str
    which: str
    state_dict: dict
    epoch: Optional[int] = None
    ignored: list = field(default_factory=list)
    num_heads: Optional[int] = None  # when the file says (tiny_ijepa ``model_args.n_head``)
    layernorm_eps: Optional[float] = None  # when not the timm/official 1e-6


def read_checkpoint(path: PathLike) -> dict:
    """Load a checkpoint file onto the CPU without executing any pickled code.

    safetensors files (by suffix or content) are read with safetensors; everything else with
    ``torch.load(weights_only=True)`` (memory-mapped where the file format allows it). Any file
    that cannot be used raises :class:`CheckpointError` with a one-line message naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    kind, head = _sniff(path)
    if path.suffix in SAFETENSORS_SUFFIXES or kind == "safetensors":
        return _read_safetensors(path)
    try:
        mmap = kind == "zip" and zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as e:  # torch.load raises many types (KeyError on text files, ...)
        raise CheckpointError(_load_error_message(path, kind, head, e)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of state dicts, found {type(obj).__name__}")
    return obj


def _sniff(path: Path) -> tuple[str, bytes]:
    """``zip`` (torch.save), ``pickle`` (legacy torch.save), ``safetensors`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip", head
    if head[:1] == b"\x80":  # pickle PROTO opcode: torch.save(_use_new_zipfile_serialization=False)
        return "pickle", head
    if len(head) > 8 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len <= path.stat().st_size:
            return "safetensors", head
    return "unknown", head


def _first_sentence(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line.split(". ")[0].rstrip(".")[:limit]


def _load_error_message(path: Path, kind: str, head: bytes, err: Exception) -> str:
    text = str(err)
    globals_ = re.findall(r"GLOBAL ([\w.]+)", text)
    if globals_:
        names = ", ".join(dict.fromkeys(globals_))
        return (
            f"{path}: refused: the file holds pickled Python objects ({names}) that could run "
            "code when loaded; only tensors and plain containers are read (weights_only=True)"
        )
    if kind == "zip" and zipfile.is_zipfile(path) and not _zip_has_pickle(path):
        return (
            f"{path}: not a PyTorch checkpoint (a zip archive without the data.pkl of torch.save)"
        )
    if kind in ("zip", "pickle"):
        if isinstance(err, pickle.UnpicklingError) and "truncated" not in text:
            detail = _unpickling_detail(text)
            return (
                f"{path}: refused: pickle data that torch.load(weights_only=True) cannot read "
                f"safely ({detail}); expected a checkpoint written by torch.save"
            )
        detail = _first_sentence(text) or type(err).__name__
        return f"{path}: truncated or corrupt checkpoint, cannot be read ({detail})"
    return (
        f"{path}: not a PyTorch checkpoint or safetensors file "
        f"(unrecognised content starting with {head[:8]!r})"
    )


def _zip_has_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _unpickling_detail(text: str) -> str:
    boilerplate = ("weights only load failed", "please file an issue", "check the documentation")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.lower().startswith(boilerplate) and "(1)" not in ln]
    detail = useful[0] if useful else (lines[0] if lines else "unreadable")
    return detail.removeprefix("WeightsUnpickler error:").strip()[:160]


def _unpickling_message(path: Path, err: Exception) -> str:
    """One line for an ``UnpicklingError`` from ``torch.load(weights_only=True)``."""
    return _load_error_message(path, "pickle", b"", err)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {"state_dict": load_file(str(path), device="cpu"), "format": "safetensors"}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def detect_format(obj: dict) -> str:
    """The layout of a loaded checkpoint: ``ijepa``, ``model``, ``state_dict``, ``safetensors``."""
    if obj.get("format") == "safetensors" and is_tensor_dict(obj.get("state_dict")):
        return "safetensors"
    if is_tiny_ijepa(obj):
        return "tiny_ijepa"
    if any(is_tensor_dict(obj.get(k)) for k in (*SUBMODELS, "predictor")):
        return "ijepa"
    if is_tensor_dict(obj.get("model")) or is_tensor_dict(obj.get("state_dict")):
        return "model"
    if is_tensor_dict(obj):
        return "state_dict"
    return "unknown"


def _strip_to_anchor(state_dict: dict, anchor: str, path: PathLike, what: str) -> tuple[dict, list]:
    """Keys under the prefix that holds ``anchor`` (e.g. ``module.``), prefix removed."""
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
    outside = [k for k in state_dict if not k.startswith(prefix)]
    return inside, outside


def find_encoder_state(
    obj: dict, path: PathLike, which: Optional[str] = "target_encoder"
) -> LoadedState:
    """The encoder state dict (prefixes stripped) inside a loaded checkpoint.

    ``which`` picks the sub-model of an I-JEPA checkpoint (``target_encoder`` or ``encoder``);
    other formats hold one encoder and ``which`` is reported as ``model``.
    """
    which = which or "target_encoder"
    if which not in SUBMODELS:
        raise ValueError(f"which={which!r}; expected one of {SUBMODELS}")
    fmt = detect_format(obj)
    epoch = _epoch_of(obj)
    if fmt == "tiny_ijepa":
        try:
            state, heads = convert_tiny_ijepa(obj["model"], obj["model_args"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: not a usable tiny-IJEPA checkpoint ({e})") from None
        ignored = [
            k
            for k in obj["model"]
            if not k.removeprefix("_orig_mod.").startswith(
                ("transformer.wte", "transformer.wpe", "transformer.h.", "transformer.ln_f")
            )
        ]
        return LoadedState(str(path), fmt, "model", state, epoch, ignored, heads, TINY_IJEPA_EPS)
    if fmt == "ijepa":
        if not is_tensor_dict(obj.get(which)):
            present = [k for k in SUBMODELS if is_tensor_dict(obj.get(k))]
            raise CheckpointError(
                f"{path}: has no '{which}' weights (sub-models present: {present or 'none'})"
            )
        raw = obj[which]
    elif fmt in ("model", "safetensors"):
        raw = obj["model"] if is_tensor_dict(obj.get("model")) else obj["state_dict"]
        which = "model"
    elif fmt == "state_dict":
        raw, which = obj, "model"
    else:
        keys = ", ".join(list(obj)[:8])
        raise CheckpointError(f"{path}: no encoder weights found (top-level keys: {keys})")
    state, outside = _strip_to_anchor(raw, ENCODER_ANCHOR, path, "encoder")
    head = [k for k in state if k.startswith("head.")]
    for k in head:
        del state[k]
    return LoadedState(str(path), fmt, which, state, epoch, ignored=outside + head)


def _epoch_of(obj: dict) -> Optional[int]:
    epoch = obj.get("epoch")
    if torch.is_tensor(epoch) and epoch.numel() == 1 and not epoch.is_floating_point():
        epoch = int(epoch)
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _check_finite(state_dict: dict, path: PathLike) -> None:
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor '{name}' holds NaN or inf values")


def _load_strict(model: torch.nn.Module, state_dict: dict, path: PathLike) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(f"{path}: weights do not match the model; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _arch_or_error(infer, state_dict: dict, num_heads: Optional[int], path: PathLike):
    try:
        return infer(state_dict, num_heads)
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete weights, missing key {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def build_encoder_from_state(
    loaded: LoadedState, num_heads: Optional[int] = None, pos_embed: str = "auto"
) -> IJEPAVisionTransformer:
    """A timm encoder holding exactly the given weights, in eval mode."""
    state = loaded.state_dict
    _check_finite(state, loaded.path)
    heads = num_heads if num_heads is not None else loaded.num_heads
    if is_variant_state(state):
        return _build_variant(loaded, heads, pos_embed)
    arch = _arch_or_error(infer_encoder_arch, state, heads, loaded.path)
    if loaded.layernorm_eps is not None:
        arch.layernorm_eps = loaded.layernorm_eps
    kind = _table_kind(state, arch, pos_embed)
    model = create_encoder(arch, pos_embed_kind=kind)
    _load_strict(model, state, loaded.path)
    return model.eval()


def _table_kind(state: dict, arch: EncoderArch, pos_embed: str) -> str:
    """How a stored ``pos_embed`` extends to other grids (``auto``: detected numerically)."""
    grid = (arch.img_size // arch.patch_size,) * 2
    if pos_embed == "auto":
        kind = pos_embed_kind_of(state["pos_embed"], grid) if "pos_embed" in state else "sincos"
    elif pos_embed in POS_EMBED_KINDS:
        kind = pos_embed
    else:
        raise ValueError(f"pos_embed must be 'auto' or one of {POS_EMBED_KINDS}, got {pos_embed!r}")
    return kind


def _build_variant(loaded: LoadedState, num_heads: Optional[int], pos_embed: str) -> VariantViT:
    """A ``VariantViT`` (registers, factorised or rotary positions) holding the given weights."""
    state = loaded.state_dict
    try:
        arch, options = variant_from_state(state, num_heads, "sincos")
    except KeyError as e:
        raise CheckpointError(f"{loaded.path}: incomplete weights, missing key {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{loaded.path}: {e}") from None
    if options["pos_kind"] in POS_EMBED_KINDS:
        options["pos_kind"] = _table_kind(state, arch, pos_embed)
    model = create_variant_encoder(arch, **options)
    _load_strict(model, state, loaded.path)
    return model.eval()


def describe_arch(arch: EncoderArch) -> str:
    grid = arch.img_size // arch.patch_size
    return (
        f"ViT depth={arch.depth} width={arch.embed_dim} heads={arch.num_heads} "
        f"patch={arch.patch_size} mlp_ratio={arch.mlp_ratio:.4g} grid={grid}x{grid}"
    )


def load_encoder(
    path: PathLike,
    which: str = "target_encoder",
    num_heads: Optional[int] = None,
    pos_embed: str = "auto",
) -> IJEPAVisionTransformer:
    """Load an I-JEPA encoder as a timm ``VisionTransformer`` in eval mode.

    ``which``: ``target_encoder`` (the EMA encoder the I-JEPA paper evaluates; default) or
    ``encoder`` (the context encoder) for I-JEPA checkpoints; ignored for single-model files.
    ``num_heads``: needed only for non-standard widths. ``pos_embed``: ``auto`` detects whether the
    stored table is the fixed sin-cos one; ``sincos``/``learned`` force how it extends to other
    input sizes. ``model.forward_features(x)`` gives (B, N, D) tokens after the final norm,
    ``model(x)`` their mean (B, D).
    """
    return load_encoder_and_source(path, which, num_heads, pos_embed)[0]


def load_encoder_and_source(
    path: PathLike, which: str, num_heads: Optional[int], pos_embed: str
) -> tuple[IJEPAVisionTransformer, LoadedState]:
    """``load_encoder``'s model and the ``LoadedState`` it came from (format, sub-model, epoch)."""
    loaded = find_encoder_state(read_checkpoint(path), path, which)
    model = build_encoder_from_state(loaded, num_heads, pos_embed)
    ignored = f", ignored {len(loaded.ignored)} other tensors" if loaded.ignored else ""
    logger.info(
        "loaded %s from %s: format=%s, %s, pos_embed=%s, epoch=%s%s",
        loaded.which, path, loaded.format, describe_arch(model.arch), model.pos_embed_kind,
        loaded.epoch, ignored,
    )  # fmt: skip
    return model, loaded


def find_predictor_state(obj: dict, path: PathLike) -> dict:
    raw = obj.get("predictor")
    if not is_tensor_dict(raw):
        raise CheckpointError(
            f"{path}: has no 'predictor' weights (format {detect_format(obj)}); "
            "only I-JEPA training checkpoints carry the predictor"
        )
    return _strip_to_anchor(raw, PREDICTOR_ANCHOR, path, "predictor")[0]


def load_predictor(
    path: PathLike, num_heads: Optional[int] = None, stop_sigma: float = 0.0
) -> IJEPAPredictor:
    """The official predictor of an I-JEPA checkpoint, in eval mode.

    Called as ``predictor(context_tokens, masks_x, masks)``. Heads default to the standard head
    count of the encoder width (as the official code builds it); pass ``num_heads`` otherwise.
    A StoP checkpoint has the same tensors; ``stop_sigma`` (0.25 in the StoP configs) gives its
    forward: target tokens get ``predictor_embed(noise)`` instead of the mask token.
    """
    state = find_predictor_state(read_checkpoint(path), path)
    _check_finite(state, path)
    arch = _arch_or_error(infer_predictor_arch, state, num_heads, path)
    model = IJEPAPredictor(arch, stop_sigma=stop_sigma)
    _load_strict(model, state, path)
    logger.info(
        "loaded predictor from %s: depth=%d width=%d heads=%d grid=%dx%d stop_sigma=%g",
        path, arch.depth, arch.predictor_embed_dim, arch.num_heads, arch.grid, arch.grid,
        stop_sigma,
    )  # fmt: skip
    return model.eval()


@contextlib.contextmanager
def atomic_target(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; fsynced and renamed over ``path`` on success.

    A crash at any moment leaves either the old file or the new one, never a partial file; on an
    exception the temporary file is removed. Temporary files of writes that a kill interrupted
    are removed by the next write (one writer per path is assumed: the main rank).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        _chmod_default(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync(path.parent)


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see ``atomic_target``).

    A failed write (disk full, quota) raises ``CheckpointWriteError`` naming the file.
    """
    writer = None
    try:
        with atomic_target(path) as tmp, open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
    except BaseException as e:
        # torch.save reports a failed write (disk full, quota) as an opaque RuntimeError
        cause = writer.error if writer is not None and writer.error else e
        if isinstance(cause, OSError):
            raise CheckpointWriteError(path, cause) from e
        raise


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, ...); the previous file is unchanged."""

    def __init__(self, path: PathLike, cause: OSError):
        reason = cause.strerror or str(cause)
        super().__init__(f"{path}: could not write the checkpoint ({reason}); the previous "
                         "file, if any, is unchanged")  # fmt: skip
        self.errno = cause.errno


class _RecordingWriter:
    """File proxy for ``torch.save`` that remembers the first ``OSError`` of a write."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _chmod_default(path: PathLike) -> None:
    """Give a temp file (created 0600) the mode a plain ``open`` would give: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync(path: PathLike) -> None:
    """Flush a written file's (or a folder's renames') data to disk; skipped where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inspect_checkpoint(path: PathLike) -> dict:
    """What a checkpoint holds, read on the CPU: format, sub-models, arch, epoch, pos_embed kind."""
    obj = read_checkpoint(path)
    fmt = detect_format(obj)
    info: dict = {"path": str(path), "format": fmt, "epoch": _epoch_of(obj), "submodels": {}}
    info["other_keys"], info["meta"] = [], {}
    if fmt == "ijepa":
        candidates = {k: obj[k] for k in (*SUBMODELS, "predictor") if is_tensor_dict(obj.get(k))}
        info["other_keys"] = [k for k in obj if k not in candidates]
    elif fmt in ("model", "safetensors"):
        key = "model" if is_tensor_dict(obj.get("model")) else "state_dict"
        candidates = {"model": obj[key]}
        info["other_keys"] = [k for k in obj if k != key and k != "format"]
    elif fmt == "state_dict":
        candidates = {"model": obj}
    elif fmt == "tiny_ijepa":
        candidates = {"model": find_encoder_state(obj, path).state_dict}
        info["other_keys"] = [k for k in obj if k != "model"]
    else:
        raise CheckpointError(f"{path}: no model weights found (top-level keys: {list(obj)[:8]})")
    for name, sd in candidates.items():
        entry = {
            "tensors": len(sd),
            "params": int(sum(t.numel() for t in sd.values())),
        }
        if name == "predictor":
            arch = _describe_or_none(infer_predictor_arch, find_predictor_state(obj, path))
            entry["arch"] = arch.to_dict() if isinstance(arch, PredictorArch) else arch
        elif any(k.endswith(ENCODER_ANCHOR) for k in sd):
            state = _strip_to_anchor(sd, ENCODER_ANCHOR, path, "encoder")[0]
            arch = _describe_or_none(infer_encoder_arch, state)
            entry["arch"] = arch.to_dict() if isinstance(arch, EncoderArch) else arch
            if isinstance(entry["arch"], dict):  # also when num_heads is unknown
                side = entry["arch"]["img_size"] // entry["arch"]["patch_size"]
                entry["pos_embed"] = pos_embed_kind_of(state["pos_embed"], (side, side))
        info["submodels"][name] = entry
    scalars = (bool, int, float, str)
    info["meta"] = {k: obj[k] for k in info["other_keys"] if isinstance(obj[k], scalars)}
    if not any("arch" in e for e in info["submodels"].values()):
        keys = ", ".join(list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        raise CheckpointError(
            f"{path}: no encoder weights found (no key ending in '{ENCODER_ANCHOR}'; keys: {keys})"
        )
    return info


def _describe_or_none(infer, state: dict):
    """Arch inferred from tensors; ``num_heads`` is None for a non-standard width."""
    try:
        return infer(state, None)
    except KeyError as e:
        return f"incomplete (missing {e})"
    except ValueError:
        pass
    try:
        arch = infer(state, 1).to_dict()
    except (KeyError, ValueError) as e:
        return f"unrecognised ({e})"
    arch["num_heads"] = None
    return arch
