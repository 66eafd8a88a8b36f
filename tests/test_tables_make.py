"""make_tables.py: golden Markdown/CSV from results.json files, running missing rows, dry-run."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ijepa_toolkit.config import load_config
from ijepa_toolkit.configs import CONFIG_DIR, find_config
from ijepa_toolkit.run_folder import resolved_config
from ijepa_toolkit.runs import write_results
from ijepa_toolkit.tables import TableConfig, check_table, main

TINY = """\
title: "Tiny table (top-1, %)"
runs_root: runs/tables
columns:
  - {name: top-1, key: metrics.top1, digits: 1}
  - {name: top-5, key: metrics.top5, digits: 2}
rows:
  - name: ViT-T linear
    protocol: logistic
    config: logistic/digits
    checkpoint: ckpt.pth.tar
    reported:
      top-1: {value: 79.3, paper: "Paper A", table: "Table 1", row: "ViT-T"}
  - name: ViT-T kNN
    protocol: knn
    config: knn/digits
    keys: {top-1: "metrics.top1@k20", top-5: "metrics.top5@k20"}
    reported:
      top-1: {value: null, paper: "Paper A"}
  - name: ViT-T 1%
    protocol: logistic
    config: logistic/digits
    overrides: [subset.per_class=2]
    reported:
      top-5: {value: 50.0, paper: "Paper B", table: "Table 2", row: "ViT-T 1%"}
"""

GOLDEN_MD = """\
## Tiny table (top-1, %)

| row | protocol | top-1 ours | top-1 paper | top-1 Δ | top-5 ours | top-5 paper | top-5 Δ | source (paper, table, row) |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |
| ViT-T linear | logistic | 80.0 | 79.3 | +0.7 | 95.25 | — | — | Paper A, Table 1, ViT-T |
| ViT-T kNN | knn | 61.2 | — | — | 88.00 | — | — | — |
| ViT-T 1% | logistic | — | — | — | — | 50.00 | — | Paper B, Table 2, ViT-T 1% |
"""  # noqa: E501

GOLDEN_CSV = """\
table,row,protocol,column,ours,paper,diff,paper_source,paper_table,paper_row,run_folder
tiny,ViT-T linear,logistic,top-1,80,79.3,0.7,Paper A,Table 1,ViT-T,runs/tables/tiny/vit-t-linear
tiny,ViT-T linear,logistic,top-5,95.25,,,,,,runs/tables/tiny/vit-t-linear
tiny,ViT-T kNN,knn,top-1,61.25,,,Paper A,,,runs/tables/tiny/vit-t-knn
tiny,ViT-T kNN,knn,top-5,88,,,,,,runs/tables/tiny/vit-t-knn
tiny,ViT-T 1%,logistic,top-1,,,,,,,runs/tables/tiny/vit-t-1pct
tiny,ViT-T 1%,logistic,top-5,,50,,Paper B,Table 2,ViT-T 1%,runs/tables/tiny/vit-t-1pct
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    return cfg


def finished(folder: str, module: str, args: list, protocol: str, metrics: dict) -> None:
    """What a finished run of ``python -m module args`` leaves: its config.yaml and results."""
    config = resolved_config(module, args)
    Path(folder).mkdir(parents=True)
    (Path(folder) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_results(folder, protocol, metrics, encoder_checkpoint=config["model"]["checkpoint"],
                  which=None)  # fmt: skip


def test_collect_golden_markdown_and_csv(tiny, tmp_path, capsys):
    folder = "runs/tables/tiny/vit-t-linear"
    finished(folder, "ijepa_toolkit.eval.logistic", ["--fname", "logistic/digits",
             "model.checkpoint=ckpt.pth.tar", f"logging.folder={folder}"], "logistic",
             {"top1": 80.0, "top5": 95.25})  # fmt: skip
    folder = "runs/tables/tiny/vit-t-knn"
    finished(folder, "ijepa_toolkit.eval.knn", ["--fname", "knn/digits",
             f"logging.folder={folder}"], "knn",
             {"top1@k20": 61.25, "top5@k20": 88.0, "top1@k10": 1.0})  # fmt: skip
    assert main(["--fname", str(tiny), "--collect"]) == 0
    out = tmp_path / "runs/tables/tiny"
    assert (out / "tiny.md").read_text() == GOLDEN_MD
    assert (out / "tiny.csv").read_text() == GOLDEN_CSV
    assert GOLDEN_MD in capsys.readouterr().out
    assert not (tmp_path / "runs/tables/tiny/vit-t-1pct").exists()  # --collect runs nothing


FAKE_ENTRYPOINT = """\
import json, sys
from pathlib import Path
import yaml
from ijepa_toolkit.runs import write_results

def main(args):
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("model.checkpoint=")), None)
    config = {"model": {"checkpoint": ckpt}}
    if "--print-config" in args:
        print(yaml.safe_dump(config))
        return 0
    with open("calls.jsonl", "a") as f:
        f.write(json.dumps(args) + "\\n")
    if "fail=1" in args:
        return 3
    folder = Path(next(a.split("=", 1)[1] for a in args if a.startswith("logging.folder=")))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"top1": float(len(args)), "top5": 99.0}
    write_results(folder, "logistic", metrics, encoder_checkpoint=ckpt, which=None)
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""


def test_runs_missing_rows_only_and_reports_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fake_logistic.py").write_text(FAKE_ENTRYPOINT)
    (tmp_path / "c.yaml").write_text("{}\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(scripts), *sys.path]))
    monkeypatch.syspath_prepend(str(scripts))  # the tables resolve a row's config in-process
    modules = {"logistic": "fake_logistic"}
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        textwrap.dedent("""\
        title: t
        columns: [{name: top-1, key: metrics.top1}]
        rows:
          - {name: a, protocol: logistic, config: c.yaml, checkpoint: a.pth, overrides: [x.y=1]}
          - {name: b, protocol: logistic, config: c.yaml, folder: done/b}
          - {name: c, protocol: logistic, config: c.yaml, overrides: [fail=1]}
        """)
    )
    Path("done/b").mkdir(parents=True)
    Path("done/b/config.yaml").write_text("model: {checkpoint: null}\n")
    write_results("done/b", "logistic", {"top1": 12.5}, encoder_checkpoint=None, which=None)
    assert main(["--fname", str(cfg)], modules) == 1  # row c failed
    calls = [json.loads(line) for line in Path("calls.jsonl").read_text().splitlines()]
    assert calls == [
        ["--fname", "c.yaml", "model.checkpoint=a.pth", "logging.folder=runs/tables/t/a", "x.y=1"],
        ["--fname", "c.yaml", "logging.folder=runs/tables/t/c", "fail=1"],
    ]  # b already had results.json: not run
    md = Path("runs/tables/t/t.md").read_text()
    assert "| a | logistic | 5.0 |" in md and "| b | logistic | 12.5 |" in md
    assert "| c | logistic | — |" in md
    assert "row 'c' failed" in capsys.readouterr().err
    assert main(["--fname", str(cfg)], modules) == 1  # only c is retried
    assert len(Path("calls.jsonl").read_text().splitlines()) == 3


def test_dry_run_lists_the_commands_of_a_paper_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--fname", "tables/ijepa_in1k", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    h14 = "model.checkpoint=checkpoints/IN1K-vit.h.14-300e.pth.tar"
    h16 = "model.checkpoint=checkpoints/IN1K-vit.h.16-448px-300e.pth.tar"
    expected = [
        ("-m ijepa_toolkit.eval.linear --fname linprobe/in1k", h14, "vit-h-14-linear"),
        ("-m ijepa_toolkit.finetune.run --fname finetune/in1k_1pct", h14, "vit-h-14-1pct"),
        ("-m ijepa_toolkit.eval.linear --fname linprobe/in1k", h16, "vit-h-16-448-linear"),
        ("-m ijepa_toolkit.finetune.run --fname finetune/in1k_1pct", h16, "vit-h-16-448-1pct"),
    ]
    for line, (script, ckpt, folder) in zip(lines, expected):
        assert script in line and ckpt in line
        assert f"logging.folder=runs/tables/ijepa_in1k/{folder}" in line
    assert lines[2].endswith("data.img_size=448 data.crop_ratio=0.875 features.layers=concat4")
    assert lines[3].endswith("data.img_size=448 data.crop_ratio=1.0")  # MAE's eval above 224
    assert lines[0].endswith("features.layers=concat4")  # the paper's best: last 4 layers
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "tables").glob("*.yaml")), ids=str)
def test_paper_tables_parse_and_cite_every_value(path):
    cfg = load_config(TableConfig, path)
    check_table(cfg, str(path))
    for row in cfg.rows:
        for reported in row.reported.values():
            if reported.value is not None:  # a number needs its source: paper, table, row
                assert reported.paper and reported.table and reported.row, (path, row.name)


def test_wrong_protocol_in_results_is_one_error_line(tiny, capsys):
    write_results(
        "runs/tables/tiny/vit-t-linear",
        "knn",
        {"top1@k20": 1.0},
        encoder_checkpoint=None,
        which=None,
    )
    assert main(["--fname", str(tiny), "--collect"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vit-t-linear/results.json" in err and "'knn'" in err


def test_unknown_column_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(TINY.replace("top-5: {value: 50.0", "top5: {value: 50.0"))
    assert main(["--fname", str(cfg), "--collect"]) == 2
    assert "row 'ViT-T 1%' names column 'top5'" in capsys.readouterr().err


def test_a_row_naming_an_unknown_config_is_one_error_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(TINY.replace("config: knn/digits", "config: knn/digit"))
    assert main(["--fname", str(cfg), "--collect"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "row 'ViT-T kNN'" in err and "knn/digits" in err
    assert find_config("knn/digits").is_file()
