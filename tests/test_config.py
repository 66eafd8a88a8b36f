"""Config system: YAML sections, dotted overrides, typed checks with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

import pytest
import yaml

from ijepa_toolkit.config import (
    ConfigError,
    LoggingSection,
    apply_overrides,
    config_parser,
    load_config,
    parse_config,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    epochs: int = 10
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "step"] = "cosine"


@dataclass
class Data:
    root: Optional[str] = None
    batch_size: int = 64
    pin_mem: bool = True


@dataclass
class Cfg:
    data: Data = field(default_factory=Data)
    optimization: Optim = field(default_factory=Optim)
    logging: LoggingSection = field(default_factory=LoggingSection)


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = write(tmp_path, {"data": {"root": "/x", "batch_size": 32}, "optimization": {"lr": 1}})
    cfg = load_config(
        Cfg, path, ["optimization.epochs=3", "data.pin_mem=false", "logging.folder=o"]
    )
    assert cfg.data.root == "/x" and cfg.data.batch_size == 32 and cfg.data.pin_mem is False
    assert cfg.optimization.lr == 1.0 and isinstance(cfg.optimization.lr, float)
    assert cfg.optimization.epochs == 3 and cfg.logging.folder == "o"
    assert cfg.optimization.betas == [0.9, 0.999]  # default kept


def test_override_parses_lists_and_strings():
    data = apply_overrides({}, ["optimization.betas=[0.5, 0.6]", "data.root=some/path"])
    assert data == {"optimization": {"betas": [0.5, 0.6]}, "data": {"root": "some/path"}}


def test_unknown_key_names_key_and_closest(tmp_path):
    path = write(tmp_path, {"optimization": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimization.lrr'.*'lr'"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"unknown config key 'optimisation'.*'optimization'"):
        load_config(Cfg, None, ["optimisation.lr=1"])


def test_wrong_type_names_key_value_and_expected(tmp_path):
    path = write(tmp_path, {"data": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"'data.batch_size' = 'big' \(str\): expected int"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"'data.batch_size' = 1.5 .*expected int"):
        load_config(Cfg, None, ["data.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"'data.pin_mem' = 1 .*expected bool"):
        load_config(Cfg, None, ["data.pin_mem=1"])
    with pytest.raises(ConfigError, match=r"'optimization.betas\[1\]' = 'x'"):
        load_config(Cfg, None, ["optimization.betas=[0.1, x]"])
    with pytest.raises(ConfigError, match=r"'optimization.schedule' = 'linear': expected one of"):
        load_config(Cfg, None, ["optimization.schedule=linear"])


def test_error_names_the_file(tmp_path):
    path = write(tmp_path, {"data": {"bogus": 1}})
    with pytest.raises(ConfigError, match=str(path)):
        load_config(Cfg, path)


def test_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"data: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, path)
    assert not marker.exists()


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Cfg, path)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Cfg, None, ["optimization.lr=0.5", "data.root=/d"])
    saved = save_config(cfg, tmp_path / "run")
    assert saved.name == "config.yaml"
    again = load_config(Cfg, saved)
    assert to_dict(again) == to_dict(cfg)


def test_cli_parse_exits_cleanly_on_bad_config(tmp_path, capsys):
    parser = config_parser("test")
    cfg, args = parse_config(Cfg, parser, ["data.batch_size=8"])
    assert cfg.data.batch_size == 8 and args.fname is None
    with pytest.raises(SystemExit) as exc:
        parse_config(Cfg, parser, ["data.batchsize=8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'data.batchsize'") and "Traceback" not in err
