"""kNN under torchrun (2 CPU processes, gloo): sharded feature extraction into one cache entry
and a training bank sharded across ranks give the single-process results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import knn_eval  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "ijepa_vit_p8_d64.pth.tar"


def test_sharded_extraction_and_bank_match_single_process(tmp_path):
    from ijepa_toolkit.data.digits import build_digits_imagefolder

    train, val = build_digits_imagefolder(tmp_path / "digits", size=32, per_class=40)
    common = [
        "--fname", str(REPO / "configs" / "knn" / "digits.yaml"), f"data.train_folder={train}",
        f"data.val_folder={val}", f"model.checkpoint={FIXTURE}", "logging.tensorboard=false",
        "data.batch_size=16", "knn.ks=[1,5,20]",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    results, feats = {}, {}
    for name in ("single", "ddp"):
        out = tmp_path / name
        args = [*common, f"logging.folder={out}", f"features.cache_dir={out / 'cache'}"]
        if name == "single":
            knn_eval.main(args[:])
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", "29517", str(REPO / "knn_eval.py"), *args]  # fmt: skip
            proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=240)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((out / "results.json").read_text())
        feats[name] = {
            json.loads((e / "meta.json").read_text())["dataset"]["num_samples"]: (
                np.load(e / "features.npy"), np.load(e / "labels.npy"))
            for e in (out / "cache").iterdir() if (e / "meta.json").is_file()
        }  # fmt: skip
    assert results["ddp"]["settings"]["world_size"] == 2
    assert results["ddp"]["metrics"] == results["single"]["metrics"]
    assert feats["ddp"].keys() == feats["single"].keys() and len(feats["ddp"]) == 2
    for n, (x, y) in feats["single"].items():
        np.testing.assert_allclose(feats["ddp"][n][0], x, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(feats["ddp"][n][1], y)
