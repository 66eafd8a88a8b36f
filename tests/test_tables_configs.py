"""Every protocol config that a paper table runs exists and parses with its entrypoint's schema."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ijepa_toolkit.config import load_config
from ijepa_toolkit.eval.depth import DepthConfig
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.tables import PROTOCOL_SCRIPTS, TableConfig

REPO = Path(__file__).resolve().parents[1]
TABLES = sorted((REPO / "configs" / "tables").glob("*.yaml"))


def script_config(script: str, name: str) -> type:
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return getattr(module, name)


SCHEMAS = {
    "logistic": lambda: script_config("logistic_eval.py", "LogisticConfig"),
    "linprobe": lambda: script_config("main_linprobe.py", "LinprobeConfig"),
    "knn": lambda: script_config("knn_eval.py", "KNNConfig"),
    "depth": lambda: DepthConfig,
    "finetune": lambda: FinetuneConfig,
}


def test_every_protocol_has_a_schema():
    assert set(SCHEMAS) == set(PROTOCOL_SCRIPTS)


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.stem)
def test_table_rows_name_existing_parsable_configs(table):
    cfg = load_config(TableConfig, table)
    assert cfg.rows
    for row in cfg.rows:
        path = REPO / row.config
        assert path.is_file(), f"{table.name}: row {row.name!r} names missing {row.config}"
        overrides = [*row.overrides, "logging.folder=x"]
        if row.checkpoint:
            overrides.append(f"model.checkpoint={row.checkpoint}")
        load_config(SCHEMAS[row.protocol](), path, overrides)
