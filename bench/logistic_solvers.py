"""Logistic regression solvers: time to the same regularised optimum.

On clustered synthetic features after MSN's preprocessing (each row centred and
L2-normalised), one lambd (``lambda_1 = lambd / N``, no intercept), each solver is run with
growing budgets (cyanure: epochs; sklearn lbfgs: iterations), each fit from scratch, and
``torch_lbfgs`` once with the protocol's stopping rule (``grad_tol`` 1e-6); the time of the
first fit whose objective is within ``--rel`` (1e-4) of the best found is printed with the
machine. ``--diagnose`` times cyanure's epochs for n_threads, dtype and solver choices (why it
is slow).

    python bench/logistic_solvers.py                   # 12,800 x 1280 features, 1000 classes
    python bench/logistic_solvers.py --small           # 1280 x 256, 100 classes: quick
    python bench/logistic_solvers.py --diagnose --n 3200 --classes 250
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ijepa_toolkit.eval import logistic as lg
from ijepa_toolkit.eval.softmax_lbfgs import convergence_of, fit_softmax_lbfgs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for contenders.py
from contenders import Row, missing  # noqa: E402


def clustered(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 MSN-preprocessed features of ``classes`` Gaussian clusters, (n,) labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = 3.0 + centres[y] + 1.5 * rng.standard_normal((n, dim), dtype=np.float32)
    return lg.msn_preprocess(x), y


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fit, x, y, lambd):
    """(objective, wall s, CPU s / wall s) of one ``fit(x, y, lambd)``."""
    t, c = time.perf_counter(), cpu_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = fit(x, y, lambd)
    wall = time.perf_counter() - t
    return convergence_of(x, y, est, lambd)["objective"], wall, (cpu_seconds() - c) / wall


def cyanure_fit(epochs: int, solver: str = "auto", threads: int = -1, it0: int = 10):
    from cyanure.estimators import Classifier

    def fit(x, y, lambd):
        est = Classifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False,
                         lambda_1=lambd / len(x), tol=1e-12, max_iter=epochs, solver=solver,
                         duality_gap_interval=min(it0, epochs), n_threads=threads,
                         random_state=0, verbose=False)  # fmt: skip
        return est.fit(x, y)

    return fit


def sklearn_fit(iters: int):
    from sklearn.linear_model import LogisticRegression

    def fit(x, y, lambd):
        est = LogisticRegression(C=1.0 / lambd, fit_intercept=False, tol=1e-12, max_iter=iters)
        return est.fit(x, y)

    return fit


def budget_runs(
    name, make, budgets, x, y, lambd, cap_s, goal: float = 0.0
) -> list[tuple[int, float, float]]:
    """[(budget, objective, seconds)] of fresh fits with growing budgets, until ``cap_s`` seconds
    are spent or the objective is at most ``goal``."""
    out, spent = [], 0.0
    for b in budgets:
        f, wall, ratio = timed(make(b), x, y, lambd)
        out.append((b, f, wall))
        spent += wall
        print(f"  {name} budget {b}: objective {f:.6g} in {wall:.1f} s (CPU/wall {ratio:.2f})")
        if spent > cap_s or f <= goal:
            break
    return out


def compare(n: int = 5000, dim: int = 512, classes: int = 200, lambd: float = 0.00025,
            rel: float = 1e-4, cap_s: float = 120.0) -> list[Row]:  # fmt: skip
    """Rows of the toolkit's ``torch_lbfgs`` vs scikit-learn's lbfgs (and cyanure, if installed):
    seconds to an objective within ``rel`` of the best any of them found."""
    x, y = clustered(n, dim, classes)
    bench = f"logistic {n}x{dim}, {classes} classes, lambd {lambd:g}"
    fit = lambda x, y, lambd: fit_softmax_lbfgs(x, y, lambd)  # noqa: E731
    f_ours, t_ours, _ = timed(fit, x, y, lambd)
    goal = f_ours * (1 + rel)  # each contender stops once it is as good as the toolkit
    runs = {"sklearn lbfgs": budget_runs("sklearn", sklearn_fit, [25, 50, 100, 200, 400, 800],
                                         x, y, lambd, cap_s, goal)}  # fmt: skip
    reason = missing("cyanure")
    if not reason:
        runs["cyanure"] = budget_runs("cyanure", cyanure_fit, [10, 30, 100, 300], x, y, lambd,
                                      cap_s, goal)  # fmt: skip
    best = min([f_ours] + [f for r in runs.values() for _, f, _ in r])
    target = best * (1 + rel)
    rows = [Row(bench, "cyanure", skipped=reason)] if reason else []
    if f_ours > target:
        t_ours = float("nan")  # (the row says the toolkit missed the target)
    for name, r in runs.items():
        hit = next((t for _, f, t in r if f <= target), None)
        if hit is None:
            rows.append(
                Row(
                    bench,
                    name,
                    skipped=f"objective {r[-1][1]:.6g} after "
                    f"{sum(t for *_, t in r):.0f} s, not within {rel:g} of {best:.8g}",
                )
            )
        else:
            rows.append(Row(bench, name, "s", t_ours, hit,
                            note=f"objective within {rel:g} of {best:.8g}"))  # fmt: skip
    return rows


def diagnose(x, y, lambd, epochs: int) -> None:
    """cyanure's seconds per epoch across n_threads, dtype and solver."""
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, cpu_count={os.cpu_count()}")
    cases = [("float32", "auto", -1), ("float32", "auto", 1), ("float64", "auto", -1),
             ("float64", "auto", 1), ("float64", "qning-ista", -1), ("float64", "svrg", -1),
             ("float64", "catalyst-miso", -1)]  # fmt: skip
    for dtype, solver, threads in cases:
        f, wall, ratio = timed(cyanure_fit(epochs, solver, threads, it0=epochs), x.astype(dtype),
                               y, lambd)  # fmt: skip
        print(f"  cyanure {dtype} solver={solver} n_threads={threads}: {wall / epochs:.2f} s/epoch"
              f" (CPU/wall {ratio:.2f}), objective after {epochs} epochs {f:.6g}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=12_800)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--lambd", type=float, default=0.00025)
    p.add_argument("--rel", type=float, default=1e-4)
    p.add_argument("--cap", type=float, default=300.0, help="seconds per solver")
    p.add_argument("--small", action="store_true")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--epochs", type=int, default=3, help="--diagnose: epochs per case")
    p.add_argument("--skip", nargs="*", default=[], help="cyanure sklearn torch")
    a = p.parse_args()
    if a.small:
        a.n, a.dim, a.classes = 1280, 256, 100
    x, y = clustered(a.n, a.dim, a.classes)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {a.n} x {a.dim}, "
          f"{a.classes} classes, lambd {a.lambd:g} (lambda_1 = lambd / N)")  # fmt: skip
    if a.diagnose:
        return diagnose(x, y, a.lambd, a.epochs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    if "torch" not in a.skip:  # the protocol's own stopping rule (max|grad| relative 1e-6)
        fit = lambda x, y, lambd: fit_softmax_lbfgs(x, y, lambd, device=device)  # noqa: E731
        f, wall, ratio = timed(fit, x, y, a.lambd)
        results["torch_lbfgs"] = [("grad_tol 1e-6", f, wall)]
        print(f"  torch_lbfgs ({device.type}): objective {f:.8g} in {wall:.1f} s "
              f"(CPU/wall {ratio:.2f})")  # fmt: skip
    if "sklearn" not in a.skip:
        results["sklearn lbfgs"] = budget_runs("sklearn", sklearn_fit, [50, 100, 200, 400, 800,
                                               1600, 3200], x, y, a.lambd, a.cap)  # fmt: skip
    if "cyanure" not in a.skip:
        results["cyanure"] = budget_runs("cyanure", cyanure_fit, [10, 30, 100, 300, 1000],
                                         x, y, a.lambd, a.cap)  # fmt: skip
    best = min(f for runs in results.values() for _, f, _ in runs)
    target = best * (1 + a.rel)
    print(f"best objective {best:.8g}; target (within {a.rel:g} relative) {target:.8g}")
    for name, runs in results.items():
        hit = next(((b, t) for b, f, t in runs if f <= target), None)
        last = runs[-1]
        print(f"  {name}: " + (f"{hit[1]:.1f} s (budget {hit[0]})" if hit else
              f"not reached in {sum(t for *_, t in runs):.0f} s; last objective {last[1]:.6g} "
              f"(relative gap {(last[1] - best) / best:.2e})"))  # fmt: skip


if __name__ == "__main__":
    main()
