"""Official and StoP releases by short name: found in ``$IJEPA_CHECKPOINTS`` or ``./checkpoints``,
one error line with the download address when absent, and the README table equal to the code's.

A tiny official-layout file (the test fixture) stands in for each release; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

from ijepa_toolkit import CheckpointError, load_encoder
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.eval import knn
from ijepa_toolkit.formats import locate, releases

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "ijepa_toolkit" / "configs"
OFFICIAL = releases.BY_NAME["IN1K-vit.h.14-300e"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """An empty working directory, ``$IJEPA_CHECKPOINTS`` unset, no network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(releases.ENV, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def place(ckpt_path: Path, folder: Path, release: releases.Release) -> Path:
    """The fixture copied to where ``release``'s file belongs in ``folder``."""
    target = folder / release.file
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt_path, target)
    return target


@torch.no_grad()
@pytest.mark.parametrize(
    "source",
    ["IN1K-vit.h.14-300e", "IN1K-vit.h.14-300e.pth.tar", "checkpoints/IN1K-vit.h.14-300e.pth.tar",
     "stop/vit-b16", "checkpoints/stop/vit-b16.pth.tar"],
)  # fmt: skip
def test_a_release_name_loads_the_file_in_ijepa_checkpoints(
    source, ckpt_path, tmp_path, monkeypatch, images
):
    store = tmp_path / "store"
    monkeypatch.setenv(releases.ENV, str(store))
    target = place(ckpt_path, store, releases.find(source))
    assert locate(source) == target
    enc = load_encoder(source, num_heads=4)
    ref = load_encoder(ckpt_path, num_heads=4)
    assert torch.equal(enc(images), ref(images))


def test_ijepa_checkpoints_comes_before_the_local_checkpoints_folder(
    ckpt_path, tmp_path, monkeypatch
):
    local = place(ckpt_path, tmp_path / "checkpoints", OFFICIAL)
    assert locate(OFFICIAL.name).resolve() == local.resolve()
    store = tmp_path / "store"
    monkeypatch.setenv(releases.ENV, os.pathsep.join([str(tmp_path / "empty"), str(store)]))
    first = place(ckpt_path, store, OFFICIAL)
    assert locate(OFFICIAL.name) == first


@pytest.mark.parametrize("release", releases.RELEASES, ids=lambda r: r.name)
def test_an_absent_release_is_one_line_naming_the_address_and_the_folder(
    release, tmp_path, monkeypatch
):
    store = tmp_path / "store"
    monkeypatch.setenv(releases.ENV, str(store))
    with pytest.raises(CheckpointError) as info:
        load_encoder(release.name)
    message = str(info.value)
    assert "\n" not in message and release.url in message
    assert f"save it as {store / release.file}," in message and releases.ENV in message


def test_other_missing_paths_stay_missing_files(tmp_path):
    for path in (tmp_path / OFFICIAL.file, "IN1K-vit.h.14-300e.pth", "elsewhere/vit-b16.pth.tar"):
        assert releases.find(str(path)) is None
        with pytest.raises(CheckpointError, match="no such file"):
            load_encoder(path)


def test_every_release_checkpoint_in_the_shipped_configs_is_a_known_release():
    found = set()
    for path in CONFIGS.rglob("*.yaml"):
        found |= set(re.findall(r"checkpoint: (checkpoints/\S+)", path.read_text()))
    assert found, "no shipped config names a release"
    for value in found:
        assert releases.find(value) is not None, value


def readme_rows() -> list[list[str]]:
    """The cells of the README's "Official checkpoints" table, one list per release row."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Official checkpoints\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_the_readme_table_is_the_release_table():
    rows = readme_rows()
    assert len(rows) == len(releases.RELEASES)
    for cells, r in zip(rows, releases.RELEASES):
        link = re.fullmatch(r"\[(.+)\]\((.+)\)", cells[6])
        assert link and link[2] == r.url and r.url.split("?")[0].endswith(link[1]), cells
        wanted = [f"`{r.name}`", r.arch, str(r.resolution), str(r.epochs), r.data, r.size]
        assert cells[:6] == wanted, cells


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("d") / "digits", 32, per_class=4)


def test_knn_runs_on_a_release_name_and_records_its_file(digits, ckpt_path, tmp_path, monkeypatch):
    train, val = digits
    store = tmp_path / "store"
    monkeypatch.setenv(releases.ENV, str(store))
    argv = ["--fname", "knn/digits", f"data.train_folder={train}", f"data.val_folder={val}",
            "model.checkpoint=IN1K-vit.h.14-300e", "knn.ks=[1]", "data.batch_size=64",
            f"features.cache_dir={tmp_path / 'cache'}",
            f"logging.folder={tmp_path / 'run'}"]  # fmt: skip
    assert knn.main(argv) == 2  # absent: the one-line error, before any model is built
    target = place(ckpt_path, store, OFFICIAL)
    assert knn.main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["encoder_checkpoint"] == str(target)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["checkpoint"] == str(target)


def test_knn_names_the_download_when_the_release_is_absent(digits, tmp_path, capsys):
    train, val = digits
    argv = ["--fname", "knn/digits", f"data.train_folder={train}", f"data.val_folder={val}",
            "model.checkpoint=stop/vit-h16", f"logging.folder={tmp_path / 'run'}"]  # fmt: skip
    assert knn.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    stop = releases.BY_NAME["stop/vit-h16"]
    assert stop.url in errors[0] and f"checkpoints/{stop.file}" in errors[0]
    assert not (tmp_path / "run").exists()
