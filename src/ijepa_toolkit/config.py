"""Typed configs: YAML files with the official I-JEPA sections, then ``a.b=value`` overrides.

Each entrypoint declares its config as nested dataclasses. ``load_config(Cls, fname, overrides)``
reads the YAML with ``yaml.safe_load`` (no Python tags), applies the dotted overrides, and builds
the dataclasses, checking every key and type: an unknown key names the closest valid one, a wrong
type names the key, the value and the expected type.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")
UNION_TYPES = (Union, getattr(types, "UnionType", Union))
CONFIG_NAME = "config.yaml"


class ConfigError(ValueError):
    """A config that does not match its schema; the message names the key."""


def require(checks: Sequence[tuple[str, Any, bool, str]]) -> None:
    """``(key, value, ok, expected)`` checks of config values, run before any expensive work
    (feature extraction, training); the first failing one is a ``ConfigError`` naming the key,
    the value and what was expected."""
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {value!r}")


def read_yaml(path: Union[str, Path]) -> dict:
    """A YAML mapping from ``path``, read with ``yaml.safe_load``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{path}: not valid YAML (or uses Python tags, which are refused): {e}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimization.lr=0.1"`` -> (["optimization", "lr"], 0.1); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with each ``a.b=value`` override set (nested mappings created)."""
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(keys[: i + 1])}' is not a section"
                )
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{path}'")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in UNION_TYPES:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise _type_error(path, value, tp)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{path}' = {value!r}: expected one of {list(args)}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, tp)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(path, value, tp)
        val_tp = args[1] if args else Any
        return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(path, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, value, tp)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(path, value, tp)


def _type_error(path: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(
        f"config key '{path}' = {value!r} ({type(value).__name__}): expected {_type_name(tp)}"
    )


def load_config(cls: type[T], fname: Optional[Union[str, Path]] = None, overrides=()) -> T:
    """Read ``fname`` (if given), apply ``a.b=value`` overrides, build and check ``cls``."""
    data = read_yaml(fname) if fname else {}
    try:
        return build(cls, apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{fname}: {e}" if fname else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples as lists), ready for YAML/JSON."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: Any, out_dir: Union[str, Path]) -> Path:
    """Write the resolved config as ``out_dir/config.yaml``; returns the path."""
    path = Path(out_dir) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CONFIG_NAME}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def config_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--fname`` and trailing ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fname", type=str, default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="config overrides: section.key=value")
    return parser


def parse_config(
    cls: type[T], parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
) -> tuple[T, argparse.Namespace]:
    """Parse the command line; a bad config prints one ``error:`` line and exits with status 2."""
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.fname, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args


@dataclasses.dataclass
class MetaSection:
    """Run-wide settings (the official ``meta`` section)."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    use_bfloat16: bool = True  # bf16 autocast on CUDA; CPU always runs fp32


@dataclasses.dataclass
class LoggingSection:
    """Where a run writes: ``folder`` holds config.yaml, log.jsonl, tensorboard events, results."""

    folder: str = "runs/default"
    write_tag: str = "run"
    tensorboard: bool = True
    log_freq: int = 10  # iterations between log.jsonl rows


@dataclasses.dataclass
class EncoderSection:
    """Which encoder to use: a checkpoint (any supported format) or a random init of ``arch``."""

    checkpoint: Optional[str] = None
    which: str = "target_encoder"  # target_encoder | encoder (I-JEPA checkpoints)
    num_heads: Optional[int] = None
    pos_embed: str = "auto"  # auto | sincos | learned
    arch: Optional[dict] = None  # EncoderArch fields, used when checkpoint is None
