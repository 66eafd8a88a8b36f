"""Multinomial logistic regression on frozen features (the MSN / StoP low-shot protocol).

Features are standardised with the training split's mean and standard deviation (applied to both
splits). The objective is ``mean_i logistic(x_i, y_i) + (lambda_1 / 2) ||W||^2`` without an
intercept, solved by cyanure, where ``lambda_1 = lambd / n_train`` as in the original MSN script.
scikit-learn's ``LogisticRegression`` minimises ``C * sum_i loss + ||W||^2 / 2``, the same
objective at ``C = 1 / lambd``; it is the fallback where cyanure is not installed.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger("ijepa_toolkit")
SOLVERS = ("cyanure", "sklearn")


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """``(x - mean) / std`` with the mean/std of ``train`` (N, D), for ``train`` and ``others``."""
    train = np.asarray(train, dtype=np.float32)
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64) + eps
    return [((np.asarray(x, np.float32) - mean) / std).astype(np.float32) for x in (train, *others)]


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    lambd: float,
    solver: str = "cyanure",
    tol: float = 1e-3,
    max_iter: int = 500,
    seed: int = 0,
):
    """A fitted estimator with ``decision_function``: (N, C) class scores of (N, D) features."""
    if solver == "cyanure":
        try:
            from cyanure.estimators import Classifier
        except ImportError:
            raise ImportError(
                "cyanure is not installed; pip install cyanure, or set logistic.solver=sklearn"
            ) from None
        est = Classifier(
            loss="multiclass-logistic", penalty="l2", lambda_1=lambd / len(x),
            fit_intercept=False, tol=tol, max_iter=max_iter, random_state=seed, verbose=False,
        )  # fmt: skip
    elif solver == "sklearn":
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(C=1.0 / lambd, fit_intercept=False, tol=tol * 1e-3,
                                 max_iter=max_iter * 10, random_state=seed)  # fmt: skip
    else:
        raise ValueError(f"logistic.solver must be one of {SOLVERS}, got {solver!r}")
    return est.fit(x, y)


def class_scores(est, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) scores; classes absent from the training labels score -inf."""
    scores = np.full((len(x), num_classes), -np.inf, dtype=np.float64)
    scores[:, np.asarray(est.classes_, dtype=np.int64)] = est.decision_function(x)
    return scores


def held_out_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: ``fraction`` of each class held out (at least one per class with
    two or more images), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def sweep_lambda(
    x: np.ndarray,
    y: np.ndarray,
    lambds: Sequence[float],
    num_classes: int,
    held_out_fraction: float = 0.2,
    seed: int = 0,
    **fit_kwargs,
) -> tuple[float, dict]:
    """The ``lambd`` with the best top-1 on a held-out part of the training set (never the test
    set), and ``{lambd: held-out top-1 %}``. Each fit standardises with its own fit part."""
    fit_idx, held_idx = held_out_split(y, held_out_fraction, seed)
    x_fit, x_held = standardize(x[fit_idx], x[held_idx])
    accs = {}
    for lambd in lambds:
        est = fit_logistic(x_fit, y[fit_idx], lambd, seed=seed, **fit_kwargs)
        pred = class_scores(est, x_held, num_classes).argmax(1)
        accs[float(lambd)] = 100.0 * float((pred == y[held_idx]).mean())
        logger.info("lambd=%g: held-out top-1 %.2f%%", lambd, accs[float(lambd)])
    best = max(accs, key=lambda k: (accs[k], -k))  # a tie goes to the smaller lambd
    return best, accs
