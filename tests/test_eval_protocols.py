"""The frozen-feature entrypoints end to end on scikit-learn's digits with the fixture encoder:
results.json, cache reuse across protocols, kNN / logistic against direct computations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import knn_eval  # noqa: E402
import logistic_eval  # noqa: E402
import main_linprobe  # noqa: E402
import rank_eval  # noqa: E402
from ijepa_toolkit.data.digits import build_digits_imagefolder  # noqa: E402
from ijepa_toolkit.eval.knn import knn_scores  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "ijepa_vit_p8_d64.pth.tar"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    train, val = build_digits_imagefolder(root / "digits", size=32)
    common = [
        f"data.train_folder={train}", f"data.val_folder={val}", "data.img_size=32",
        "data.crop_ratio=1.0", "data.num_workers=0", f"model.checkpoint={FIXTURE}",
        "model.num_heads=4", f"features.cache_dir={root / 'cache'}", "logging.tensorboard=false",
    ]  # fmt: skip
    return root, common


def run(module, root: Path, common: list, name: str, *extra: str) -> dict:
    module.main([*common, f"logging.folder={root / name}", *extra])
    return json.loads((root / name / "results.json").read_text())


def cache_entries(root: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "cache").glob("*/features.npy")}


def cached(root: Path, results: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The cached (features, labels) a run used, found by layers and image count."""
    n = results["settings"]["n_train" if split == "train" else "n_test"]
    for entry in (root / "cache").iterdir():
        meta = json.loads((entry / "meta.json").read_text()) if entry.is_dir() else {}
        if meta.get("layers") == results["features"] and meta["dataset"]["num_samples"] == n:
            return np.load(entry / "features.npy"), np.load(entry / "labels.npy")
    raise AssertionError(f"no cached {split} features")


def test_knn_entrypoint_matches_brute_force(setup):
    root, common = setup
    res = run(knn_eval, root, common, "knn", "knn.ks=[1,10,20,200]")
    assert res["protocol"] == "knn" and res["features"] == "last"
    assert res["which"] == "target_encoder" and res["checkpoint"] == str(FIXTURE)
    assert set(res["metrics"]) == {f"top{t}@k{k}" for t in (1, 5) for k in (1, 10, 20, 200)}
    x_tr, y_tr = cached(root, res, "train")
    x_te, y_te = cached(root, res, "test")
    tn = x_tr / np.linalg.norm(x_tr, axis=1, keepdims=True)
    sn = x_te / np.linalg.norm(x_te, axis=1, keepdims=True)
    sims = sn.astype(np.float64) @ tn.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")
    ours = knn_scores(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), 10,
                      ks=(1, 10, 20, 200))  # fmt: skip
    for k in (1, 10, 20, 200):
        votes = np.zeros((len(x_te), 10))
        rows = np.arange(len(x_te))[:, None]
        np.add.at(votes, (rows, y_tr[order[:, :k]]), np.exp(sims[rows, order[:, :k]] / 0.07))
        pred = votes.argmax(1)
        np.testing.assert_array_equal(ours[k].argmax(1).numpy(), pred)
        assert res["metrics"][f"top1@k{k}"] == pytest.approx(100 * (pred == y_te).mean())


def test_protocols_share_one_extraction(setup):
    root, common = setup
    run(knn_eval, root, common, "knn_first")
    before = cache_entries(root)
    assert len(before) == 2  # train and val, last-layer features
    res_lin = run(main_linprobe, root, common, "lin", "optimization.epochs=3",
                  "optimization.base_lrs=[0.1,1.0]", "optimization.batch_size=128")  # fmt: skip
    res_rank = run(rank_eval, root, common, "rank", "rank.lidar_images=20", "rank.lidar_views=4")
    assert cache_entries(root) == before  # no second extraction, files untouched
    assert res_lin["settings"]["cache_reused"] == {"train": True, "test": True}
    assert res_rank["settings"]["cache_reused"] is True
    assert res_lin["protocol"] == "linprobe" and set(res_lin["metrics"]) == {"top1", "top5"}
    held, s = res_lin["settings"]["held_out_top1"], res_lin["settings"]
    assert held[f"lr{s['lr_selected']:g}_wd{s['wd_selected']:g}"] == max(held.values())
    assert 1.0 <= res_rank["metrics"]["rankme"] <= 64 and res_rank["metrics"]["lidar"] >= 1.0
    for name in ("knn_first", "lin", "rank"):
        assert (root / name / "config.yaml").is_file() and (root / name / "log.jsonl").is_file()


def test_linprobe_concat4_and_online_modes(setup):
    root, common = setup
    quick = ["optimization.epochs=1", "optimization.base_lrs=[0.1]", "optimization.batch_size=64"]
    c4 = run(main_linprobe, root, common, "lin_c4", *quick, "features.layers=concat4",
             "optimization.optimizer=sgd", "optimization.schedule=step",
             "optimization.weight_decays=[0.0,0.01]")  # fmt: skip
    assert c4["features"] == "concat4" and c4["settings"]["optimizer"] == "sgd"
    assert c4["settings"]["schedule"] == "linear warmup + x0.1 every 15 epochs"
    assert set(c4["settings"]["held_out_top1"]) == {"lr0.025_wd0", "lr0.025_wd0.01"}
    x, _ = cached(root, c4, "test")
    assert x.shape[1] == 4 * 64  # 4 blocks of the width-64 fixture
    online = run(main_linprobe, root, common, "lin_online", *quick, "linprobe.mode=online")
    assert online["settings"]["mode"].startswith("online")
    assert online["settings"]["n_held_out"] + online["settings"]["n_fit"] == 1347


def test_logistic_equals_direct_cyanure_and_sklearn_agrees(setup):
    from cyanure.estimators import Classifier

    root, common = setup
    res = run(logistic_eval, root, common, "logistic", "logistic.lambd=0.1")
    assert res["protocol"] == "logistic" and res["settings"]["cache_reused"]["test"] is True
    x_tr, y_tr = cached(root, res, "train")
    x_te, y_te = cached(root, res, "test")
    mean, std = x_tr.astype(np.float64).mean(0), x_tr.astype(np.float64).std(0) + 1e-6
    clf = Classifier(loss="multiclass-logistic", penalty="l2", lambda_1=0.1 / len(x_tr),
                     fit_intercept=False, tol=1e-3, max_iter=300, verbose=False)  # fmt: skip
    clf.fit(((x_tr - mean) / std).astype(np.float32), y_tr)
    direct = 100 * (clf.predict(((x_te - mean) / std).astype(np.float32)) == y_te).mean()
    assert res["metrics"]["top1"] == pytest.approx(direct, abs=1e-9)
    sk = run(logistic_eval, root, common, "logistic_sk", "logistic.lambd=0.1",
             "logistic.solver=sklearn")  # fmt: skip
    assert abs(sk["metrics"]["top1"] - res["metrics"]["top1"]) <= 0.5


def test_lambda_sweep_picks_on_held_out_training_images(setup):
    root, common = setup
    res = run(logistic_eval, root, common, "sweep", "logistic.lambd=[0.1,10.0,1000.0]",
              "subset.per_class=20", "subset.seed=3")  # fmt: skip
    held = res["settings"]["held_out_top1"]
    assert res["settings"]["lambd_selected"] == float(max(held, key=held.get))
    assert res["settings"]["n_train"] == 200 and held["1000.0"] < held["0.1"]


def test_bad_input_is_one_error_line(setup, tmp_path, capsys):
    root, common = setup
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    for module, extra in (
        (knn_eval, [f"data.train_folder={tmp_path / 'empty'}"]),
        (logistic_eval, [f"subset.file={tmp_path / 'missing.txt'}"]),
        (knn_eval, ["features.layers=middle"]),
        (knn_eval, ["data.val_folder="]),
    ):
        with pytest.raises(SystemExit) as err:
            module.main([*common, f"logging.folder={tmp_path / 'run'}", *extra])
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: ")


@pytest.mark.parametrize("script, key, value", [
    ("main_linprobe", "optimization.schedule", "linear"),
    ("main_linprobe", "optimization.optimizer", "adam"),
    ("main_linprobe", "optimization.weight_decays", "[]"),
    ("main_linprobe", "linprobe.held_out_fraction", "1.5"),
    ("knn_eval", "knn.ks", "[0,10]"),
    ("knn_eval", "knn.temperature", "0"),
    ("logistic_eval", "logistic.solver", "liblinear"),
    ("logistic_eval", "logistic.lambd", "[0.1,-1]"),
    ("logistic_eval", "logistic.held_out_fraction", "0"),
])  # fmt: skip
def test_bad_protocol_settings_are_refused_before_extracting(setup, tmp_path, capsys, script,
                                                             key, value):  # fmt: skip
    root, common = setup
    module = {"main_linprobe": main_linprobe, "knn_eval": knn_eval,
              "logistic_eval": logistic_eval}[script]  # fmt: skip
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as err:
        module.main([*common, f"logging.folder={tmp_path / 'run'}",
                     f"features.cache_dir={cache}", f"{key}={value}"])  # fmt: skip
    assert err.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {key} must be ")
    assert not cache.exists()  # refused before any feature was extracted
