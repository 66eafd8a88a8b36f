"""Feature caches that hold pickles are never unpickled (the entry is re-extracted); subset files
naming images that are not in the dataset are one error line."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.eval import knn as knn_eval
from ijepa_toolkit.eval import logistic as logistic_eval

from .common import REPO


class Payload:
    """Unpickling this writes ``marker``: the proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def digits_args(tmp_path) -> list[str]:
    train, val = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=10)
    return [f"data.train_folder={train}", f"data.val_folder={val}", "meta.device=cpu",
            f"model.checkpoint={REPO}/tests/fixtures/ijepa_vit_p8_d64.pth.tar",
            f"features.cache_dir={tmp_path / 'cache'}", "logging.tensorboard=false"]  # fmt: skip


def poison(entry: Path, marker: Path) -> None:
    """Replace both arrays by pickles (an object-dtype ``.npy`` and a bare pickle) and make
    ``meta.json`` agree with them (shapes, checksums), as an attacker would."""
    np.save(entry / "features.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    (entry / "labels.npy").write_bytes(pickle.dumps(Payload(marker)))
    meta = json.loads((entry / "meta.json").read_text())
    for name in ("features", "labels"):
        meta[f"{name}_sha256"] = hashlib.sha256((entry / f"{name}.npy").read_bytes()).hexdigest()
    meta["features_shape"] = [1]
    (entry / "meta.json").write_text(json.dumps(meta))


def test_pickled_feature_cache_is_never_executed_and_is_reextracted(digits_args, tmp_path):
    args = ["--fname", "knn/digits", *digits_args]
    assert knn_eval.main([*args, f"logging.folder={tmp_path / 'first'}"]) == 0
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 2  # train and val
    marker = tmp_path / "pwned"
    for entry in entries:
        poison(entry, marker)
    assert knn_eval.main([*args, f"logging.folder={tmp_path / 'second'}"]) == 0
    assert not marker.exists(), "a pickle in the feature cache was executed"
    second = json.loads((tmp_path / "second" / "results.json").read_text())
    assert second["metrics"] == first["metrics"]
    for entry in entries:  # re-extracted: plain arrays again
        assert np.load(entry / "features.npy").dtype == np.float32
        assert np.load(entry / "labels.npy").dtype == np.int64


def test_subset_file_with_unknown_names_is_one_error_line(digits_args, tmp_path, capsys):
    train = Path(digits_args[0].split("=", 1)[1])
    known = sorted(p.name for p in (train / "0").iterdir())[:2]
    listing = tmp_path / "1percent.txt"
    listing.write_text("\n".join([*known, "n01440764_10026.JPEG", "../../etc/passwd"]) + "\n")
    args = ["--fname", "logistic/digits", *digits_args,
            f"subset.file={listing}", f"logging.folder={tmp_path / 'r'}"]  # fmt: skip
    assert logistic_eval.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {listing}: 2 of 4 listed images are not in the dataset, e.g. "
                       "n01440764_10026.JPEG, ../../etc/passwd")  # fmt: skip
    assert not (tmp_path / "r" / "results.json").exists()
