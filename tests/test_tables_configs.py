"""Every protocol config that a paper table runs exists and parses with its entrypoint's schema."""

from __future__ import annotations

import importlib

import pytest

from ijepa_toolkit.config import load_config
from ijepa_toolkit.configs import CONFIG_DIR, find_config
from ijepa_toolkit.eval.depth import DepthConfig
from ijepa_toolkit.eval.knn import KNNConfig
from ijepa_toolkit.eval.linear import LinprobeConfig
from ijepa_toolkit.eval.logistic import LogisticConfig
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.tables import PROTOCOL_MODULES, TableConfig

TABLES = sorted((CONFIG_DIR / "tables").glob("*.yaml"))
SCHEMAS = {
    "logistic": LogisticConfig,
    "linprobe": LinprobeConfig,
    "knn": KNNConfig,
    "depth": DepthConfig,
    "finetune": FinetuneConfig,
}


def test_every_protocol_has_a_schema_and_a_module_with_main():
    assert set(SCHEMAS) == set(PROTOCOL_MODULES)
    for module in PROTOCOL_MODULES.values():
        assert callable(importlib.import_module(module).main), module


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.stem)
def test_table_rows_name_existing_parsable_configs(table):
    cfg = load_config(TableConfig, table)
    assert cfg.rows
    for row in cfg.rows:
        path = find_config(row.config)  # a shipped name: raises if missing
        overrides = [*row.overrides, "logging.folder=x"]
        if row.checkpoint:
            overrides.append(f"model.checkpoint={row.checkpoint}")
        load_config(SCHEMAS[row.protocol], path, overrides)
