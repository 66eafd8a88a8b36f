"""Config system: YAML sections, dotted overrides, typed checks with clear errors."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional

import pytest
import yaml

from ijepa_toolkit.config import (
    ConfigError,
    LoggingSection,
    apply_overrides,
    build,
    config_parser,
    load_config,
    parse_config,
    require_paths,
    save_config,
    to_dict,
)
from ijepa_toolkit.configs import find_config
from ijepa_toolkit.errors import ConfigError as TaxonomyConfigError
from ijepa_toolkit.finetune.config import FinetuneConfig


@dataclass
class Optim:
    lr: float = 1e-3
    epochs: int = 10
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "step"] = "cosine"
    clip: Optional[float] = None  # max gradient norm


@dataclass
class Data:
    root: Optional[str] = None
    batch_size: int = 64  # images per step
    pin_mem: bool = True
    calls = 0  # not a field: how often the checks hook ran

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        type(self).calls += 1
        return [("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")]


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
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optimization.lrr'.*'optimization.lr'"
    ):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"unknown config key 'optimisation'.*'optimization'"):
        load_config(Cfg, None, ["optimisation.lr=1"])


def test_wrong_type_names_key_value_and_expected(tmp_path):
    path = write(tmp_path, {"data": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"^data.batch_size must be int, got 'big' \(str\)"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"^data.batch_size must be int, got 1.5 \(float\)$"):
        load_config(Cfg, None, ["data.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"^data.pin_mem must be bool, got 1 \(int\)$"):
        load_config(Cfg, None, ["data.pin_mem=1"])
    with pytest.raises(ConfigError, match=r"^optimization.betas\[1\] must be float, got 'x'"):
        load_config(Cfg, None, ["optimization.betas=[0.1, x]"])


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
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
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


SPELLINGS = ["1e-3", "1E-3", "1.0e-3", "1.e-3", ".5", "-2e-5", "+1e3", "1.5E+3", "2.5e3", "0.1"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_numbers_in_every_spelling_are_floats_in_yaml_and_overrides(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"optimization:\n  lr: {text}\n  clip: {text}\n  betas: [{text}, {text}]\n")
    from_file = load_config(Cfg, path)
    from_override = load_config(
        Cfg, None, [f"optimization.lr={text}", f"optimization.clip={text}",
                    f"optimization.betas=[{text}, {text}]"],
    )  # fmt: skip
    for cfg in (from_file, from_override):
        o = cfg.optimization
        assert o.lr == o.clip == float(text) and type(o.lr) is float and type(o.clip) is float
        assert o.betas == [float(text)] * 2 and all(type(b) is float for b in o.betas)


def test_int_fields_take_integral_floats_only_and_quoted_numbers_stay_strings():
    cfg = load_config(Cfg, None, ["optimization.epochs=1e3", "data.batch_size=32.0"])
    assert cfg.optimization.epochs == 1000 and type(cfg.optimization.epochs) is int
    assert cfg.data.batch_size == 32 and type(cfg.data.batch_size) is int
    with pytest.raises(ConfigError, match=r"^optimization.epochs must be int, got 1500.5"):
        load_config(Cfg, None, ["optimization.epochs=1.5005e3"])
    assert load_config(Cfg, None, ["data.root='1e-3'"]).data.root == "1e-3"


def test_optional_type_is_named_float_or_null():
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, None, ["optimization.clip=big"])
    assert str(err.value) == "optimization.clip must be float or null, got 'big' (str)"
    assert load_config(Cfg, None, ["optimization.clip=null"]).optimization.clip is None


@dataclass
class Inner:
    mode: Literal["batch", "pair", "elem"] = "batch"
    grid: Optional[List[float]] = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)


@dataclass
class Deep:
    outer: Outer = field(default_factory=Outer)
    data: Data = field(default_factory=Data)

    def checks(self) -> list[tuple[str, Any, bool, str]]:  # across sections: full keys
        ok = self.outer.inner.mode != "elem" or self.data.batch_size % 2 == 0
        return [("data.batch_size", self.data.batch_size, ok, "even with outer.inner.mode=elem")]


def test_literal_error_is_one_line_with_full_key_value_and_choices(tmp_path):
    path = write(tmp_path, {"outer": {"inner": {"mode": "pixel"}}})
    with pytest.raises(ConfigError) as err:
        load_config(Deep, path)
    assert str(err.value) == (
        f"outer.inner.mode must be one of ['batch', 'pair', 'elem'], got 'pixel' "
        f"(config file: {path})"
    )
    cfg = load_config(Deep, None, ["outer.inner.grid=[1e-3, 1E-2, .5]"])
    assert cfg.outer.inner.grid == [float(t) for t in ("1e-3", "1E-2", ".5")]


def test_checks_hook_runs_once_per_section_and_names_the_dotted_key(tmp_path):
    Data.calls = 0
    cfg = load_config(Deep, None, ["data.batch_size=6"])
    assert cfg.data.batch_size == 6 and Data.calls == 1
    load_config(Deep, None, ["outer.inner.mode=pair"])  # data left at its defaults
    assert Data.calls == 2
    with pytest.raises(ConfigError) as err:
        load_config(Deep, write(tmp_path, {"data": {"batch_size": 0}}))
    assert str(err.value).startswith("data.batch_size must be >= 1, got 0 (config file: ")
    with pytest.raises(ConfigError, match=r"^data.batch_size must be >= 1, got -2$"):
        build(Data, {"batch_size": -2}, "data")
    with pytest.raises(ConfigError) as err:
        load_config(Deep, None, ["outer.inner.mode=elem", "data.batch_size=3"])
    assert str(err.value) == "data.batch_size must be even with outer.inner.mode=elem, got 3"


def test_require_paths_names_key_and_path(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    require_paths(
        [("data.train_folder", tmp_path, "folder"), ("a.file", tmp_path / "f.txt", "file")]
    )
    missing = tmp_path / "nope"
    cases = [
        ("data.val_folder", missing, "folder"),
        ("data.train_folder", tmp_path / "f.txt", "folder"),
        ("model.checkpoint", tmp_path, "file"),
        ("data.val_folder", None, "folder"),
    ]
    for key, path, kind in cases:
        with pytest.raises(ConfigError) as err:
            require_paths([(key, path, kind)])
        want = repr(None if path is None else str(path))
        assert str(err.value) == f"{key} must be an existing {kind}, got {want}"


def all_keys(cls, where=""):
    """(dotted key, field) of every leaf key of a config dataclass."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out += all_keys(type(sub), key) if dataclasses.is_dataclass(sub) else [(key, sub)]
    return out


def test_help_lists_every_key_with_default_type_and_doc(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(FinetuneConfig, config_parser("finetune"), ["--help"])
    assert exc.value.code == 0
    lines = {ln.split(" = ")[0].strip(): ln for ln in capsys.readouterr().out.splitlines()}
    keys = all_keys(FinetuneConfig)
    assert len(keys) > 50
    for key, default in keys:
        shown = yaml.safe_load(lines[key].split(" = ", 1)[1].split("  (")[0])
        assert shown == (list(default) if isinstance(default, tuple) else default), key
    assert "(float or null)  absolute lr; overrides blr" in lines["optimization.lr"]
    assert "(one of ['batch', 'pair', 'elem'])" in lines["mixup.mode"]
    with pytest.raises(SystemExit):
        parse_config(Cfg, config_parser("test"), ["--help"])
    out = capsys.readouterr().out
    assert "  data.batch_size = 64  (int)  images per step" in out
    assert "  optimization.clip = null  (float or null)  max gradient norm" in out


def test_print_config_prints_resolved_yaml_and_exits_0(tmp_path, capsys):
    path = write(tmp_path, {"optimization": {"epochs": 3}})
    argv = ["--fname", str(path), "--print-config", "optimization.lr=1e-4", "data.root=/d"]
    with pytest.raises(SystemExit) as exc:
        parse_config(Cfg, config_parser("test"), argv)
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(Cfg, path, ["optimization.lr=1e-4", "data.root=/d"]))
    assert printed["optimization"]["lr"] == 1e-4 and printed["optimization"]["epochs"] == 3


@dataclass
class Knn:
    temperature: float = 0.07
    ks: List[int] = field(default_factory=lambda: [10, 20])


@dataclass
class KnnCfg:
    knn: Knn = field(default_factory=Knn)


def test_did_you_mean_names_the_full_dotted_key(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(KnnCfg, config_parser("knn"), ["knn.temprature=0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unknown config key 'knn.temprature'; did you mean 'knn.temperature'?\n"


@pytest.mark.parametrize("arg", ["configs/knn/digits.yaml", "knn/digits"])
def test_positional_config_path_suggests_fname(capsys, arg):
    with pytest.raises(SystemExit) as exc:
        parse_config(KnnCfg, config_parser("knn"), [arg])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"did you mean --fname {arg}?")


def test_fname_takes_a_shipped_config_name():
    by_name = load_config(FinetuneConfig, "finetune/tiny_cpu", ["data.batch_size=8"])
    by_path = load_config(FinetuneConfig, find_config("finetune/tiny_cpu"), ["data.batch_size=8"])
    assert to_dict(by_name) == to_dict(by_path) and by_name.data.batch_size == 8
    with pytest.raises(ConfigError, match="finetune/tiny_cpux: no such config file"):
        load_config(FinetuneConfig, "finetune/tiny_cpux")


def test_config_error_is_the_taxonomy_one_and_overrides_leave_input_unchanged():
    assert ConfigError is TaxonomyConfigError
    data = {"a": {"b": [1, {"c": 2}], "d": {"e": None}}}
    before = copy.deepcopy(data)
    out = apply_overrides(data, ["a.b=3", "a.x=1e-3"])
    assert data == before and out == {"a": {"b": 3, "d": {"e": None}, "x": 1e-3}}
    out = apply_overrides(data, [])
    out["a"]["b"][1]["c"] = 5
    assert data == before


def test_python_tags_in_overrides_are_plain_strings(tmp_path):
    marker = tmp_path / "pwned"
    cfg = load_config(Cfg, None, [f"data.root=!!python/object/apply:os.system ['touch {marker}']"])
    assert isinstance(cfg.data.root, str) and not marker.exists()
