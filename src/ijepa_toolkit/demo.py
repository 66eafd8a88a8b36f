"""``make demo`` / ``ijepa-demo``: the whole toolkit on real images that ship with the install
(no downloads), in ``runs/demo/`` under the current directory.

1. scikit-learn's digits as a 32x32 ImageFolder (stratified train/val) and rendered depth scenes;
2. a tiny I-JEPA pretrained on the training digits (the shipped config ``demo/pretrain``);
3. kNN, logistic regression and a linear probe on it and on the same architecture at random init;
4. finetuning of both; 5. the depth probe on both;
6. one Markdown table (protocol x {pretrained, random init}) and PNGs in ``runs/demo/``.

Each step is a standalone command, ``python -m <toolkit module>``, printed before it runs (the
demo calls the module's ``main`` with those arguments in a process forked from its own). A
step whose ``results.json`` was made from the same encoder checkpoint, config and data is
reused, so a second run only rebuilds the table; a stale one is run again (``--overwrite``), an
interrupted training step continues (``--resume``); ``--fresh`` reruns everything.

``--threads N`` (default 1) pins the thread count of every step (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, torch and ``threadpoolctl``): the same N gives the
same table on any machine, and ``table.md`` ends with ``threads: N``. A result made at another
thread count (``results.json``'s ``environment.threads``) is run again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .plots import FIGURES
from .run_folder import OUTPUTS, results_staleness
from .tables import read_metric

OUT = Path("runs/demo")
CHECKPOINT = OUT / "pretrain" / "checkpoint-last.pth"
# steps that own their run folder (run_folder.open_run): they take --resume / --overwrite
OWNING = {"ijepa_toolkit.pretrain.train", "ijepa_toolkit.eval.linear",
          "ijepa_toolkit.finetune.run", "ijepa_toolkit.eval.depth"}  # fmt: skip


@dataclass
class Row:
    """One table row: a protocol module and its shipped ``demo/<config>``, run for the
    pretrained and the random encoder."""

    label: str
    metric: str  # dotted key into results.json
    unit: str
    module: str
    config: str
    folder: str  # under runs/demo
    higher_is_better: bool = True


ROWS = [
    Row("kNN (k=20, T=0.07)", "metrics.top1@k20", "top-1 %", "ijepa_toolkit.eval.knn", "knn",
        "knn"),
    Row("logistic regression (cyanure)", "metrics.top1", "top-1 %",
        "ijepa_toolkit.eval.logistic", "logistic", "logistic"),
    Row("linear probe (BN + linear, LARS)", "metrics.top1", "top-1 %",
        "ijepa_toolkit.eval.linear", "linprobe", "linprobe"),
    Row("finetuning (4 epochs)", "metrics.top1", "top-1 %", "ijepa_toolkit.finetune.run",
        "finetune", "finetune"),
    Row("depth probe (rendered scenes)", "metrics.rmse", "RMSE m", "ijepa_toolkit.eval.depth",
        "depth", "depth", higher_is_better=False),
]  # fmt: skip
ENCODERS = {
    "pretrained": [f"model.checkpoint={CHECKPOINT}"],
    "random init": ["model.checkpoint=null"],
}


def run(module: str, *args: str) -> None:
    """Print and run one step, the equivalent of ``python -m module args``, in a process forked
    from this one (``module.main(args)``: the imports are already done, so no second torch
    start-up per step, and no step sees another's process state); stop the demo if it fails.
    The step runs at this process's pinned thread counts (``pin_threads``)."""
    shown = " ".join(["python", "-m", module, *args])
    print(f"\n$ {shown}", flush=True)
    start = time.time()
    importlib.import_module(module)  # here, once: the forked step inherits it
    child = multiprocessing.get_context("fork").Process(target=_main, args=(module, list(args)))
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"demo: step failed: {shown}")
    print(f"  ({time.time() - start:.1f}s)", flush=True)


def _main(module: str, argv: list) -> None:
    """The body of a forked step: ``module.main(argv)`` as its exit status."""
    sys.exit(importlib.import_module(module).main(argv))


def step(module: str, args: list, folder: Path, env: dict) -> None:
    """Run ``python -m module args`` into ``folder`` unless its results.json still fits
    (``run_folder.results_staleness``): a stale result is replaced, an interrupted run of a
    folder-owning step continues."""
    flags = []
    if (folder / "results.json").is_file():
        reason = results_staleness(folder, module, args) or other_threads(folder, env)
        if reason is None:
            print(f"\n{folder}: up to date, reused", flush=True)
            return
        print(f"\n{folder}/results.json: {reason}; running again", flush=True)
        flags = ["--overwrite"] if module in OWNING else []
    elif module in OWNING and any((folder / name).exists() for name in OUTPUTS):
        flags = ["--resume"]
    run(module, *args, *flags)


def other_threads(folder: Path, env: dict) -> Optional[str]:
    """Why ``folder/results.json`` (readable: ``results_staleness`` said so) was made at another
    thread count than the one ``env`` pins; None when at the same."""
    recorded = json.loads((folder / "results.json").read_text()).get("environment", {})
    wanted = int(env["OMP_NUM_THREADS"])
    if recorded.get("threads") == wanted:
        return None
    return f"made at {recorded.get('threads')} threads, the demo runs at {wanted}"


def pin_threads(threads: int) -> dict:
    """Pin this process (every step is forked from it) to ``threads``: torch's intra-op pool, the
    BLAS/OpenMP pools of numpy, scikit-learn and cyanure (``threadpoolctl``) and the variables
    child processes read; returns the environment."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = str(threads)
    return dict(os.environ)


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


def run_steps(env: dict) -> Path:
    """Data, pretraining, every protocol for both encoders, the pictures; returns the plots
    folder."""
    data = OUT / "data"
    run("ijepa_toolkit.data.digits", str(data / "digits"), "--size", "32")
    if not (data / "synthetic_depth" / "nyu_test.txt").is_file():
        run("ijepa_toolkit.data.synthetic_depth", str(data / "synthetic_depth"))
    step("ijepa_toolkit.pretrain.train", ["--fname", "demo/pretrain"], OUT / "pretrain", env)
    for row in ROWS:
        for name, overrides in ENCODERS.items():
            folder = OUT / row.folder / name.replace(" ", "_")
            args = ["--fname", f"demo/{row.config}", *overrides, f"logging.folder={folder}"]
            step(row.module, args, folder, env)
    plots = OUT / "plots"
    run("ijepa_toolkit.viz", "masks", "--fname", "demo/pretrain", "--steps", "1", "--images",
        "8", "--out", str(plots))  # fmt: skip
    run("ijepa_toolkit.viz", "pca", "--fname", "demo/visualize")
    run("ijepa_toolkit.plots", str(OUT), str(plots))
    return plots


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.demo [--fresh] [--threads N]``: exit status 0 (a failed step
    exits)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fresh", action="store_true", help="rerun every step (keeps the data)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of every step (default 1): same N, same table",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: expected a whole number >= 1")
    start = time.time()
    env = pin_threads(args.threads)
    if args.fresh:
        for sub in ("pretrain", "plots", "cache", *(r.folder for r in ROWS)):
            shutil.rmtree(OUT / sub, ignore_errors=True)
    plots = run_steps(env)
    text = f"{table(OUT)}\n\nthreads: {args.threads}"
    (OUT / "table.md").write_text(text + "\n")
    print(f"\n{text}\n")
    print(f"wrote {OUT}/table.md and {plots}/: masks_step0.png, pca.png, {', '.join(FIGURES)}")
    print(f"demo finished in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
