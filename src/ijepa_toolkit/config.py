"""Typed configs: YAML files with the official I-JEPA sections, then ``a.b=value`` overrides.

Each entrypoint declares its config as nested dataclasses. ``load_config(Cls, fname, overrides)``
finds ``fname`` (a path or a shipped name such as ``knn/digits``), reads it with a safe YAML
loader (no Python tags), applies the dotted overrides, and builds the dataclasses, checking every
key and type: an unknown key names the closest valid one (full dotted key); a wrong type or value
is ``<key> must be <expected>, got <value>`` (``float or null``, ``one of ['a', 'b']``, ``>= 1``),
followed by the config file's name.

Numbers: ``1e-3``, ``1E-3``, ``1.0e3``, ``-2e-5``, ``.5`` are floats in YAML files and overrides
alike (YAML 1.2 rules; PyYAML's YAML 1.1 rules would read ``1e-3`` as a string). An ``int`` field
takes an integral float (``1e3`` -> 1000, ``32.0`` -> 32) and refuses ``1.5``.

Choices are ``typing.Literal`` fields: a value outside them is one error line naming the key,
the value and the allowed values. Do not write "one of" checks by hand.

Section checks: a section dataclass may define a ``checks`` method returning
``(key, value, ok, expected)`` tuples, keys relative to the section::

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        return [("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")]

``build`` calls it once, right after constructing the section (sections left at their defaults
and the root config too: the root's keys are full keys, for checks across sections); the first
failing tuple is a ``ConfigError`` ``"<section>.<key> must be <expected>, got <value>"``
(``require``'s format). Checks that need the file system go in the entrypoint, before any model
is built: ``require_paths([("data.train_folder", path, "folder"), ...])``.

Documentation: a field's trailing ``# comment`` in its dataclass is its documentation; ``--help``
lists every key with its type, default and that comment (``config_help``), and
``--print-config`` prints the resolved config as YAML and exits 0 (``parse_config``).
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import copy
import dataclasses
import difflib
import functools
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

import yaml

from .errors import ConfigError
from .io.atomic import write_yaml

__all__ = ["ConfigError", "build", "load_config", "parse_config", "require", "require_paths"]

T = TypeVar("T")
UNION_TYPES = (Union, getattr(types, "UnionType", Union))
SEQUENCE_TYPES = (list, tuple, Sequence, collections.abc.Sequence)
CONFIG_NAME = "config.yaml"
PathLike = Union[str, os.PathLike]


class AliasRefused(yaml.YAMLError):
    """A YAML alias (``*name``) in a config: refused, so a few hundred bytes of nested aliases
    cannot expand exponentially (configs never need them)."""


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (Python tags refused) that also reads ``1e-3``, ``1E3``, ``-2e-5`` and
    ``1.0e3`` as floats, as YAML 1.2 does (YAML 1.1 needs a dot and a signed exponent), and
    refuses aliases (``AliasRefused``) before building anything."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(
                f"line {event.start_mark.line + 1}: YAML alias *{event.anchor} refused "
                "(anchors and aliases are not supported in configs: write the values out)"
            )
        return super().compose_node(parent, index)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def require(checks: Sequence[tuple[str, Any, bool, str]]) -> None:
    """``(key, value, ok, expected)`` checks of config values, run before any expensive work
    (feature extraction, training); the first failing one is a ``ConfigError`` naming the key,
    the value and what was expected."""
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {value!r}")


def require_paths(paths: Sequence[tuple[str, Optional[PathLike], str]]) -> None:
    """``(dotted_key, path, "folder" | "file")`` existence checks, cheap enough to run before any
    model is built; the first missing one is a ``ConfigError`` naming the key and the path."""
    exists = {"folder": os.path.isdir, "file": os.path.isfile}
    require([
        (key, None if path is None else str(path), bool(path) and exists[kind](path),
         f"an existing {kind}")
        for key, path, kind in paths
    ])  # fmt: skip


def read_yaml(path: PathLike) -> dict:
    """A YAML mapping from ``path``, read with ``ConfigLoader`` (safe; numbers in any spelling)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=ConfigLoader)
    except AliasRefused as e:
        raise ConfigError(f"{path}: {e}") from None
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
        hint = ""
        if not sep and (text.endswith((".yaml", ".yml")) or "/" in text):
            hint = f"; did you mean --fname {text}?"
        raise ConfigError(f"override {text!r} is not of the form key.sub=value{hint}")
    try:
        value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(
    data: dict, overrides: Sequence[str], values: Sequence[tuple[str, Any]] = ()
) -> dict:
    """A copy of ``data`` with each ``("a.b", value)`` of ``values`` (the shortcut flags), then
    each ``a.b=value`` override set (nested mappings created)."""
    out = copy.deepcopy(data)
    for text, (keys, value) in [*((k, (k.split("."), v)) for k, v in values),
                                *((t, parse_override(t)) for t in overrides)]:  # fmt: skip
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


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively, then run the
    section's ``checks`` hook (see the module docstring)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = (
                f"; did you mean '{_join(where, close[0])}'?"
                if close
                else f"; valid keys: {sorted(fields)}"
            )
            raise ConfigError(f"unknown config key '{_join(where, key)}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{_join(where, name)}'")
    section = cls(**kwargs)
    for name in (n for n in fields if n not in data):  # default sections are checked too
        if dataclasses.is_dataclass(default := getattr(section, name)):
            _check_defaults(default, _join(where, name))
    _check(section, where)
    return section


def _check(section: Any, where: str) -> None:
    """Run ``section.checks()`` (if defined) with the keys prefixed by ``where``."""
    hook = getattr(section, "checks", None)
    if callable(hook):
        require([(_join(where, key), value, ok, want) for key, value, ok, want in hook()])


def _check_defaults(section: Any, where: str) -> None:
    for f in dataclasses.fields(section):
        if dataclasses.is_dataclass(value := getattr(section, f.name)):
            _check_defaults(value, _join(where, f.name))
    _check(section, where)


def _type_name(tp: Any) -> str:
    """``float``, ``float or null``, ``one of ['a', 'b']``, ``list of float``, ``mapping``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in UNION_TYPES:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in SEQUENCE_TYPES or tp in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) == len(args) > 1:
            return f"list of {len(args)} {' / '.join(dict.fromkeys(map(_type_name, args)))}"
        return f"list of {_type_name(items[0])}" if items else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
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
            raise ConfigError(f"{path} must be {_type_name(tp)}, got {value!r}")
        return value
    if origin in SEQUENCE_TYPES or tp in (list, tuple):
        return _convert_items(value, tp, path)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(path, value, tp)
        val_tp = args[1] if args else Any
        return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    return _convert_scalar(value, tp, path)


def _convert_items(value: Any, tp: Any, path: str) -> Union[list, tuple]:
    """A list (or tuple, with its fixed length checked) with every item converted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fixed = origin is tuple and args and Ellipsis not in args
    if not fixed and value is not None and not isinstance(value, (list, tuple, dict)):
        value = [value]  # one value for a list: knn.ks=10 is [10]
    if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
        raise _type_error(path, value, tp)
    types_ = args if fixed else [args[0] if args else Any] * len(value)
    items = [_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, types_))]
    return tuple(items) if (origin or tp) is tuple else items


def _convert_scalar(value: Any, tp: Any, path: str) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int and number and float(value).is_integer():
        return int(value)
    if tp is float and number:
        return float(value)
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp not in (int, float, bool, str) and isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(path, value, tp)


def _type_error(path: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"{path} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def find_config_file(name_or_path: PathLike) -> Path:
    """The config file of ``--fname``: an existing path, or a shipped name (``knn/digits``)."""
    from .configs import find_config

    return find_config(str(name_or_path))


def load_config(
    cls: type[T],
    fname: Optional[PathLike] = None,
    overrides: Sequence[str] = (),
    values: Sequence[tuple[str, Any]] = (),
) -> T:
    """Read ``fname`` (a path or a shipped config name; optional), set ``values`` (``("a.b",
    value)``) and apply the ``a.b=value`` overrides, build and check ``cls``."""
    path = find_config_file(fname) if fname else None
    data = read_yaml(path) if path else {}
    try:
        return build(cls, apply_overrides(data, overrides, values))
    except ConfigError as e:
        raise ConfigError(f"{e} (config file: {path})" if path else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples as lists), ready for YAML/JSON."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: Any, out_dir: PathLike) -> Path:
    """Write the resolved config as ``out_dir/config.yaml`` (atomically); returns the path."""
    return write_yaml(to_dict(cfg), Path(out_dir) / CONFIG_NAME, "config")


_PRAGMA = re.compile(r"^(fmt|noqa|type|pragma)\b")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` of a dataclass: the trailing ``# comments`` of its field lines (base
    classes included), read from the source with ``inspect`` and ``tokenize``; ``{}`` for a
    class whose source cannot be read."""
    docs: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            source = textwrap.dedent(inspect.getsource(base))
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
            body = ast.parse(source).body[0].body
        except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndexError, AttributeError):
            continue
        comments = {
            t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT
        }
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                lines = range(node.lineno, node.end_lineno + 1)
                text = [comments[i] for i in lines if i in comments]
                text = [t for t in text if not _PRAGMA.match(t)]
                if text:
                    docs[node.target.id] = " ".join(text)
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    dumped = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 30)
    return dumped.split("\n")[0]


def _class_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc.split("\n\n")[0].replace("\n", " ")


def config_help(cls: type, where: str = "") -> str:
    """Every key of config dataclass ``cls``: ``key = default  (type)  doc``, sections nested."""
    hints, docs, lines = typing.get_type_hints(cls), field_docs(cls), []
    for f in (f for f in dataclasses.fields(cls) if f.init):
        key, tp, doc = _join(where, f.name), hints[f.name], docs.get(f.name, "")
        if dataclasses.is_dataclass(tp):
            about = "; ".join(filter(None, [_class_doc(tp), doc]))
            lines += [f"{key}:" + (f"  {about}" if about else ""), config_help(tp, key)]
        else:
            line = f"  {key} = {_default_text(f)}  ({_type_name(tp)})"
            lines.append(f"{line}  {doc}" if doc else line)
    return "\n".join(lines)


def config_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--fname``, ``--print-config`` and ``key=value`` overrides;
    ``parse_config`` adds the list of config keys to its ``--help``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fname", type=str, default=None,
        help="YAML config: a file path or a shipped config name (e.g. knn/digits)",
    )  # fmt: skip
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (file + overrides) as YAML and exit",
    )  # fmt: skip
    for flags, dest, keys in SHORTCUTS:
        parser.add_argument(*flags, dest=dest, default=None, metavar="PATH",
                            help=f"shortcut for {' and '.join(keys)}")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="config overrides: section.key=value")
    return parser


# The DINO / DINOv2 / MAE spellings of the usual paths -> config keys. --data-path is the
# ImageNet layout they read: ROOT/train and ROOT/val. A section.key=value override wins.
SHORTCUTS = (
    (("--pretrained-weights", "--pretrained_weights"), "pretrained_weights", ("model.checkpoint",)),
    (("--output-dir", "--output_dir"), "output_dir", ("logging.folder",)),
    (("--data-path", "--data_path"), "data_path", ("data.train_folder", "data.val_folder")),
)


def shortcut_values(cls: type, args: argparse.Namespace) -> list[tuple[str, Any]]:
    """``[("model.checkpoint", path), ...]`` of the shortcut flags given, for the keys ``cls``
    has; ``ConfigError`` for a flag none of whose keys ``cls`` has."""
    out = []
    for flags, dest, keys in SHORTCUTS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        known = [k for k in keys if _has_key(cls, k.split("."))]
        if not known:
            raise ConfigError(f"{flags[0]}: this entrypoint's config has no {' or '.join(keys)}")
        for key in known:
            sub = {"data.train_folder": "train", "data.val_folder": "val"}.get(key)
            out.append((key, str(Path(value) / sub) if dest == "data_path" else value))
    return out


def _has_key(cls: Any, keys: list[str]) -> bool:
    """Whether the dataclass ``cls`` has the nested field ``keys`` (``["data", "val_folder"]``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if keys[0] not in fields:
        return False
    if len(keys) == 1:
        return True
    return _has_key(typing.get_type_hints(cls).get(keys[0]), keys[1:])


def parse_config(
    cls: type[T], parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
) -> tuple[T, argparse.Namespace]:
    """Parse the command line; a bad config prints one ``error:`` line and exits with status 2.

    ``--help`` lists every config key of ``cls`` (default, type, doc); ``--print-config``
    prints the resolved config as YAML and exits with status 0.
    """
    if not parser.epilog:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "config keys (YAML section.key, or section.key=value):\n"
        parser.epilog += config_help(cls)
    args = parser.parse_intermixed_args(argv)  # flags before, between or after key=value
    try:
        cfg = load_config(cls, args.fname, args.overrides, shortcut_values(cls, args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        raise SystemExit(0)
    return cfg, args


@dataclasses.dataclass
class MetaSection:
    """Run-wide settings (the official ``meta`` section)."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (the local rank's GPU) | cuda:N
    use_bfloat16: bool = True  # bf16 autocast on CUDA; CPU always runs fp32

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        ok = re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", str(self.device)) is not None
        return [("device", self.device, ok, "auto, cpu, cuda or cuda:N")]


@dataclasses.dataclass
class LoggingSection:
    """Where a run writes: ``folder`` holds config.yaml, log.jsonl, tensorboard events, results."""

    folder: str = "runs/default"
    write_tag: str = "run"
    tensorboard: bool = True
    log_freq: int = 10  # iterations between log.jsonl rows

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        return [("log_freq", self.log_freq, self.log_freq >= 1, ">= 1")]


@dataclasses.dataclass
class EncoderSection:
    """Which encoder to use: a checkpoint (any supported format) or a random init of ``arch``."""

    checkpoint: Optional[str] = None  # path of the encoder checkpoint (None: random init)
    which: typing.Literal["target_encoder", "encoder"] = "target_encoder"  # I-JEPA checkpoints
    num_heads: Optional[int] = None  # only for checkpoints that do not carry their architecture
    pos_embed: typing.Literal["auto", "sincos", "learned"] = "auto"
    arch: Optional[dict] = None  # EncoderArch fields, used when checkpoint is None

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        heads = self.num_heads
        return [("num_heads", heads, heads is None or heads >= 1, "null or >= 1")]
