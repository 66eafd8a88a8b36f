"""The frozen-feature entrypoints end to end on scikit-learn's digits with the fixture encoder:
results.json, cache reuse across protocols, kNN / logistic against direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ijepa_toolkit import load_encoder
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.eval import knn as knn_eval
from ijepa_toolkit.eval import linear as main_linprobe
from ijepa_toolkit.eval import logistic as logistic_eval
from ijepa_toolkit.eval import rank as rank_eval
from ijepa_toolkit.eval.knn import knn, knn_scores

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ijepa_vit_p8_d64.pth.tar"


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
    assert module.main([*common, f"logging.folder={root / name}", *extra]) == 0
    return json.loads((root / name / "results.json").read_text())


def cache_entries(root: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "cache").glob("*/features.npy")}


def cached(root: Path, results: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The cached (features, labels) a run used, found by layers and image count."""
    n = results["settings"]["n_train" if split == "train" else "n_test"]
    for entry in (root / "cache").iterdir():
        meta = json.loads((entry / "meta.json").read_text()) if entry.is_dir() else {}
        layers = results["settings"]["layers"]
        if meta.get("layers") == layers and meta["dataset"]["num_samples"] == n:
            return np.load(entry / "features.npy"), np.load(entry / "labels.npy")
    raise AssertionError(f"no cached {split} features")


def test_knn_entrypoint_matches_brute_force(setup):
    root, common = setup
    res = run(knn_eval, root, common, "knn", "knn.ks=[1,10,20,200]")
    assert res["protocol"] == "knn" and res["settings"]["layers"] == "last"
    assert res["which"] == "target_encoder" and res["encoder_checkpoint"] == str(FIXTURE)
    assert res["output_checkpoint"] is None and res["environment"]["torch"] == torch.__version__
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
    encoder = load_encoder(FIXTURE, num_heads=4)  # the Python function: same numbers, no cache
    train, val = (common[i].partition("=")[2] for i in (0, 1))
    ours = knn(encoder, train, val, (1, 10, 20, 200), img_size=32, crop_ratio=1.0, num_workers=0)
    assert ours == pytest.approx(res["metrics"], abs=1e-4)


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
    assert res_rank["settings"]["cache_reused"] == {"val": True}
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
    assert c4["settings"]["layers"] == "concat4" and c4["settings"]["optimizer"] == "sgd"
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
    res = run(logistic_eval, root, common, "logistic", "logistic.lambd=0.1",
              "logistic.preprocess=standardize")  # fmt: skip
    assert res["protocol"] == "logistic" and res["settings"]["cache_reused"]["test"] is True
    assert res["settings"]["preprocess"] == "standardize"
    x_tr, y_tr = cached(root, res, "train")
    x_te, y_te = cached(root, res, "test")
    mean, std = x_tr.astype(np.float64).mean(0), x_tr.astype(np.float64).std(0) + 1e-6
    clf = Classifier(loss="multiclass-logistic", penalty="l2", lambda_1=0.1 / len(x_tr),
                     fit_intercept=False, tol=1e-3, max_iter=300, duality_gap_interval=10,
                     verbose=False)  # fmt: skip
    clf.fit(((x_tr - mean) / std).astype(np.float32), y_tr)
    direct = 100 * (clf.predict(((x_te - mean) / std).astype(np.float32)) == y_te).mean()
    assert res["metrics"]["top1"] == pytest.approx(direct, abs=1e-9)
    sk = run(logistic_eval, root, common, "logistic_sk", "logistic.lambd=0.1",
             "logistic.solver=sklearn", "logistic.preprocess=standardize")  # fmt: skip
    assert abs(sk["metrics"]["top1"] - res["metrics"]["top1"]) <= 0.5  # measured: docs/eval.md


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
        assert module.main([*common, f"logging.folder={tmp_path / 'run'}", *extra]) == 2
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
    assert module.main([*common, f"logging.folder={tmp_path / 'run'}",
                        f"features.cache_dir={cache}", f"{key}={value}"]) == 2  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{key}" in last
    assert not cache.exists()  # refused before any feature was extracted


def test_linprobe_nan_loss_is_one_error_line_naming_the_last_good_checkpoint(
    setup, tmp_path, capsys
):
    """Every head diverged: one ``error:`` line naming the last good checkpoint, exit 1, and that
    checkpoint is not overwritten by the diverged epoch."""
    root, common = setup
    out = tmp_path / "run"
    args = ["--fname", "linprobe/digits", *common, f"logging.folder={out}",
            "optimization.base_lrs=[1.0]", "optimization.warmup_epochs=0"]  # fmt: skip
    assert main_linprobe.main([*args, "optimization.epochs=1"]) == 0
    good = torch.load(out / "checkpoint-last.pth", weights_only=True)
    # resumed with an absurd lr (a resume refuses another lr when it can compare: the saved
    # config is removed), LARS blows the head's weights up to inf within epoch 2
    (out / "config.yaml").unlink()
    assert main_linprobe.main([*args, "optimization.epochs=2", "optimization.base_lrs=[1e30]",
                        "--resume"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert err[-1].startswith("error: loss is nan at epoch 1 in every head"), err[-1]
    assert err[-1].endswith(f"(last good checkpoint: {out / 'checkpoint-last.pth'})")
    after = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert after["epoch"] == good["epoch"] == 1
    assert all(torch.equal(v, after["model"][k]) for k, v in good["model"].items())
