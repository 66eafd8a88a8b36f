"""The configs that ship with the toolkit: ``<area>/<name>.yaml`` (``knn/digits``, ``demo/knn``).

Every entrypoint's ``--fname`` takes a file path or one of these names (``find_config``).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent


def shipped_configs() -> list[str]:
    """Names (``area/name``, no ``.yaml``) of every config shipped with the package, sorted."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
                  for p in CONFIG_DIR.glob("*/*.yaml"))  # fmt: skip


def find_config(name_or_path: str) -> Path:
    """The config file ``name_or_path`` names: an existing file wins; else the shipped config
    ``<area>/<name>`` (with or without ``.yaml``, a leading ``configs/`` ignored).

    An unknown name is a ``ConfigError`` listing the closest shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("configs/").removesuffix(".yaml")
    shipped = CONFIG_DIR / f"{name}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    names = shipped_configs()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    close += [n for n in names if n.startswith(f"{name.split('/')[0]}/") and n not in close]
    hint = f"; did you mean {', '.join(close[:5])}?" if close else f"; shipped: {', '.join(names)}"
    raise ConfigError(f"{name_or_path}: no such config file, nor a shipped config name{hint}")
