"""``make demo``: the whole toolkit on real images that ship with the install (no downloads).

1. scikit-learn's digits as a 32x32 ImageFolder (stratified train/val) and rendered depth scenes;
2. a tiny I-JEPA pretrained on the training digits (``configs/demo/pretrain.yaml``);
3. kNN, logistic regression and a linear probe on it and on the same architecture at random init;
4. finetuning of both; 5. the depth probe on both;
6. one Markdown table (protocol x {pretrained, random init}) and PNGs in ``runs/demo/``.

Each step is a standalone command (printed before it runs). A step whose ``results.json``
exists is reused, so a second run only rebuilds the table; ``--fresh`` reruns everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .tables import read_metric

REPO = Path(__file__).resolve().parents[2]
OUT = Path("runs/demo")
CHECKPOINT = OUT / "pretrain" / "checkpoint-last.pth"


@dataclass
class Row:
    """One table row: an entrypoint and config, run for the pretrained and the random encoder."""

    label: str
    metric: str  # dotted key into results.json
    unit: str
    script: str
    config: str
    folder: str  # under runs/demo
    higher_is_better: bool = True


ROWS = [
    Row("kNN (k=20, T=0.07)", "metrics.top1@k20", "top-1 %", "knn_eval.py", "knn", "knn"),
    Row("logistic regression (cyanure)", "metrics.top1", "top-1 %", "logistic_eval.py",
        "logistic", "logistic"),
    Row("linear probe (BN + linear, LARS)", "metrics.top1", "top-1 %", "main_linprobe.py",
        "linprobe", "linprobe"),
    Row("finetuning (4 epochs)", "metrics.top1", "top-1 %", "main_finetuning.py", "finetune",
        "finetune"),
    Row("depth probe (rendered scenes)", "metrics.rmse", "RMSE m", "depth_eval.py", "depth",
        "depth", higher_is_better=False),
]  # fmt: skip
ENCODERS = {
    "pretrained": [f"model.checkpoint={CHECKPOINT}"],
    "random init": ["model.checkpoint=null"],
}


def run(cmd: list[str], env: dict) -> None:
    """Print and run one step from the repository root; stop the demo if it fails."""
    shown = " ".join(["python", *cmd[1:]])
    print(f"\n$ {shown}", flush=True)
    start = time.time()
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        sys.exit(f"demo: step failed: {shown}")
    print(f"  ({time.time() - start:.1f}s)", flush=True)


def done(folder: Path) -> bool:
    return (REPO / folder / "results.json").is_file()


def metric(folder: Path, key: str) -> Optional[float]:
    """The dotted ``key`` of ``folder/results.json``; None while that run has not finished."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    return read_metric(json.loads(path.read_text()), key, path)


def table(runs: Path) -> str:
    """Markdown table of every row for both encoders (``runs/<row>/<encoder>/results.json``),
    the better value of each row in bold."""
    lines = [
        "| protocol | metric | pretrained I-JEPA | random init |",
        "| --- | --- | --- | --- |",
    ]
    for row in ROWS:
        values = [metric(runs / row.folder / k.replace(" ", "_"), row.metric) for k in ENCODERS]
        cells = [f"{v:.2f}" if v is not None else "—" for v in values]
        if None not in values and values[0] != values[1]:
            best = values.index(max(values) if row.higher_is_better else min(values))
            cells[best] = f"**{cells[best]}**"
        lines.append(f"| {row.label} | {row.unit} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="rerun every step (keeps the data)")
    args = parser.parse_args(argv)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    py = sys.executable
    if args.fresh:
        for sub in ("pretrain", "plots", "cache", *(r.folder for r in ROWS)):
            shutil.rmtree(REPO / OUT / sub, ignore_errors=True)

    data = OUT / "data"
    run([py, "-m", "ijepa_toolkit.data.digits", str(data / "digits"), "--size", "32"], env)
    if not (REPO / data / "synthetic_depth" / "nyu_test.txt").is_file():
        run([py, "-m", "ijepa_toolkit.data.synthetic_depth", str(data / "synthetic_depth")], env)
    if not done(OUT / "pretrain"):
        run([py, "main_pretrain.py", "--fname", "configs/demo/pretrain.yaml"], env)
    for row in ROWS:
        for name, overrides in ENCODERS.items():
            folder = OUT / row.folder / name.replace(" ", "_")
            if not done(folder):
                cmd = [py, row.script, "--fname", f"configs/demo/{row.config}.yaml",
                       *overrides, f"logging.folder={folder}"]  # fmt: skip
                run(cmd, env)
    plots = OUT / "plots"
    run([py, "visualize.py", "masks", "--fname", "configs/demo/pretrain.yaml", "--steps", "1",
         "--images", "8", "--out", str(plots)], env)  # fmt: skip
    run([py, "visualize.py", "pca", "--fname", "configs/demo/visualize.yaml"], env)
    run([py, "visualize.py", "curve", str(OUT / "pretrain" / "log.jsonl"), "loss",
         str(plots / "pretrain_loss.png")], env)  # fmt: skip

    text = table(REPO / OUT)
    (REPO / OUT / "table.md").write_text(text + "\n")
    print(f"\n{text}\n")
    print(f"wrote {OUT}/table.md and {plots}/: pretrain_loss.png, masks_step0.png, pca.png")
    print(f"demo finished in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
