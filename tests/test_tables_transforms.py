"""Every paper-table row's protocol config names its source's eval transform and uses it.

Each config a table row runs carries one ``# transform source: owner/repo@commit <file>: ...``
line (the upstream file read, issue 15 item 5) and sets its transform fields itself, not by
default. The transform the protocol really builds (with the row's overrides) must be one of the
``Resize(R, interpolation), CenterCrop(C)`` the source line states, so the comment and the
config cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_tables_configs import SCHEMAS
from torchvision import transforms

from ijepa_toolkit.config import load_config
from ijepa_toolkit.configs import CONFIG_DIR, find_config
from ijepa_toolkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ijepa_toolkit.eval.features import build_eval_dataset
from ijepa_toolkit.tables import TableConfig

SOURCE_LINE = re.compile(r"^# transform source: ([\w.-]+/[\w.-]+)@([0-9a-f]{7,40}) (\S+.*)$", re.M)
RESIZE_CROP = re.compile(r"Resize\((\d+), (bicubic|bilinear)\), CenterCrop\((\d+)\)")
IMAGE_FIELDS = ("img_size", "crop_ratio", "interpolation", "mean", "std")
FIELDS = {"depth": ("crop_size", "input_scale", "flip")}  # depth: no resize / crop transform


def table_rows() -> list[tuple[str, object]]:
    rows = []
    for table in sorted((CONFIG_DIR / "tables").glob("*.yaml")):
        rows += [(f"{table.stem}:{r.name}", r) for r in load_config(TableConfig, table).rows]
    return rows


ROWS = table_rows()


def transform_problems(path: Path, protocol: str) -> list[str]:
    """What ``path`` lacks: its source line, or a ``data`` transform field (left to default)."""
    text = path.read_text()
    single = len(SOURCE_LINE.findall(text)) == 1
    problems = [] if single else ["no single '# transform source:' line"]
    data = (yaml.safe_load(text) or {}).get("data") or {}
    missing = [k for k in FIELDS.get(protocol, IMAGE_FIELDS) if k not in data]
    return problems + [f"data.{k} not set" for k in missing]


def built_transform(row, tmp_path: Path) -> transforms.Compose:
    """The eval transform the row's protocol builds from its config and overrides."""
    cfg = load_config(SCHEMAS[row.protocol], find_config(row.config), list(row.overrides))
    if row.protocol == "finetune":  # finetune/run.py builds its validation transform so
        d = cfg.data
        return eval_transform(d.img_size, d.crop_ratio, d.mean, d.std)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    return build_eval_dataset(str(tmp_path), cfg.data).transform


def test_the_check_fails_on_a_config_without_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# a linear probe\ndata:\n  img_size: 224\n  crop_ratio: 0.875\n")
    assert transform_problems(path, "linprobe") == [
        "no single '# transform source:' line",
        "data.interpolation not set",
        "data.mean not set",
        "data.std not set",
    ]


@pytest.mark.parametrize("row", [r for _, r in ROWS], ids=[i for i, _ in ROWS])
def test_row_config_states_its_source_and_sets_the_fields(row):
    assert transform_problems(find_config(row.config), row.protocol) == [], row.config


@pytest.mark.parametrize("row", [r for _, r in ROWS], ids=[i for i, _ in ROWS])
def test_row_overrides_of_the_size_also_set_the_crop_ratio(row):
    keys = {o.split("=", 1)[0] for o in row.overrides}
    assert "data.img_size" not in keys or "data.crop_ratio" in keys, row.name


IMAGE_ROWS = [(i, r) for i, r in ROWS if r.protocol not in FIELDS]


@pytest.mark.parametrize("row", [r for _, r in IMAGE_ROWS], ids=[i for i, _ in IMAGE_ROWS])
def test_row_transform_is_one_its_source_line_states(row, tmp_path):
    ((_, _, stated),) = SOURCE_LINE.findall(find_config(row.config).read_text())
    pairs = {(int(r), interp, int(c)) for r, interp, c in RESIZE_CROP.findall(stated)}
    assert pairs, f"{row.config}: no 'Resize(R, interpolation), CenterCrop(C)' in {stated!r}"
    resize, crop, _, normalize = built_transform(row, tmp_path).transforms
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    assert (size, resize.interpolation.value, crop.size[0]) in pairs, row.name
    if "ImageNet mean/std" in stated:
        assert list(normalize.mean) == list(IMAGENET_MEAN), row.config
        assert list(normalize.std) == list(IMAGENET_STD), row.config
