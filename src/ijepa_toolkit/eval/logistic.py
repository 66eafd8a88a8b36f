"""Multinomial logistic regression on frozen features (the MSN / StoP low-shot protocols).

The objective is ``mean_i logistic(x_i, y_i) + (lambda_1 / 2) ||W||^2`` without an intercept,
solved by cyanure, where ``lambda_1 = lambd / n_train`` as in MSN's and StoP's
``logistic_eval.py``; ``it0`` (cyanure's ``duality_gap_interval``), ``tol`` and ``max_iter``
(epochs) are theirs too. The features are first preprocessed (``logistic.preprocess``):

- ``msn`` (MSN facebookresearch/msn@4388dc1 ``logistic_eval.py``, the protocol I-JEPA's 1% rows
  cite): ``cyanure.preprocess(X, normalize=True, columns=False, centering=True)`` on the training
  and the test features separately: each sample minus its own mean, then L2-normalised.
- ``stop`` (StoP amirbar/StoP@72206b3 ``logistic_eval.py``): training columns standardised
  (unbiased std), rotated by the eigenvectors of their Gram matrix; the test features
  standardised with *their own* mean/std (``logistic.stop_test_stats: own``, StoP's code) or the
  training ones (``train``), then rotated alike. A rotation leaves an l2 fit without intercept
  unchanged (``W -> V^T W``); it is applied for fidelity.
- ``standardize``: columns standardised with the training split's mean/std, both splits.

scikit-learn's ``LogisticRegression`` minimises ``C * sum_i loss + ||W||^2 / 2``, the same
objective at ``C = 1 / lambd``; it is the fallback where cyanure is not installed (measured gaps:
docs/eval.md). A list of ``lambd`` is swept on a held-out part of the training subset (never the
test set), then the best is refit on the whole subset; where no held-out split exists (one image
per class) MSN's own rule applies: the one ``logistic.fallback_lambd``, with a warning.

    python -m ijepa_toolkit.eval.logistic --fname logistic/digits [section.key=value ...]
    ijepa-logistic --fname ... subset.file=1percent.txt "logistic.lambd=[0.0001,0.001]"

From Python: ``logistic(encoder, train_folder, val_folder)`` or ``logistic_features(x_train,
y_train, x_test, y_test)``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np

from ..config import EncoderSection, LoggingSection, MetaSection
from ..data.subsets import SubsetSection
from ..engine.utils import progress
from ..errors import ConfigError
from .features import EvalDataSection, FeaturesSection
from .frozen import (
    cache_settings,
    check_same_classes,
    encode_folders,
    finish_run,
    held_out_split,
    protocol_main,
    split_features,
    start_run,
    subset_indices,
)

if TYPE_CHECKING:  # torch is imported when a fit starts, not with the module (--help)
    import torch

logger = logging.getLogger("ijepa_toolkit")
Solver = Literal["cyanure", "sklearn", "torch_lbfgs"]
Preprocess = Literal["msn", "stop", "standardize"]
TestStats = Literal["own", "train"]
PREPROCESS_TEXT = {
    "msn": "each sample centred and L2-normalised, train and test separately (MSN)",
    "stop": "train columns standardised (unbiased std) and rotated onto their Gram eigenvectors; "
    "test standardised with {stats} statistics, same rotation (StoP)",
    "standardize": "train-subset column mean/std, both splits",
}


@dataclass
class LogisticSection:
    preprocess: Preprocess = "msn"  # msn (I-JEPA/MSN 1%) | stop (StoP rows) | standardize
    stop_test_stats: TestStats = "own"  # stop: test features standardised with their own stats
    lambd: Union[float, list[float]] = 0.00025  # divided by n_train; a list is swept
    fallback_lambd: float = 0.00025  # MSN's default: used when a list cannot be swept (1 per class)
    solver: Solver = "cyanure"  # sklearn | torch_lbfgs: the same objective (docs/eval.md)
    grad_tol: float = 1e-6  # torch_lbfgs: stop at max|grad| <= grad_tol * max|grad at W=0|
    held_out_fraction: float = 0.2  # of each class of the training subset, for the sweep
    tol: float = 1e-3  # cyanure: relative duality gap
    max_iter: int = 300  # epochs (MSN 300, StoP 100)
    it0: int = 10  # cyanure duality_gap_interval: the gap is checked every it0 epochs

    def lambds(self) -> list[float]:
        return self.lambd if isinstance(self.lambd, list) else [self.lambd]

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lambds, frac = self.lambds(), self.held_out_fraction
        return [
            ("lambd", self.lambd, bool(lambds) and min(lambds) > 0, "> 0 (or a list of such)"),
            ("fallback_lambd", self.fallback_lambd, self.fallback_lambd > 0, "> 0"),
            ("held_out_fraction", frac, 0 < frac < 1, "between 0 and 1"),
            ("max_iter", self.max_iter, self.max_iter >= 1, ">= 1"),
            ("it0", self.it0, self.it0 >= 1, ">= 1"),
            ("grad_tol", self.grad_tol, self.grad_tol > 0, "> 0"),
        ]

    def preprocess_text(self) -> str:
        return PREPROCESS_TEXT[self.preprocess].format(
            stats="their own" if self.stop_test_stats == "own" else "the training"
        )


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """``(x - mean) / std`` with the mean/std of ``train`` (N, D), for ``train`` and ``others``."""
    train = np.asarray(train, dtype=np.float32)
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64) + eps
    return [((np.asarray(x, np.float32) - mean) / std).astype(np.float32) for x in (train, *others)]


def msn_preprocess(x: np.ndarray) -> np.ndarray:
    """(N, D) float32: each row minus its own mean, then divided by its L2 norm (a constant row
    stays 0), as ``cyanure.preprocess(X, centering=True, normalize=True, columns=False)``."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and unbiased std (torch's default, as StoP) of (N, D) ``x``; a zero or
    undefined (N = 1) std is 1, where StoP's division would give inf/NaN."""
    std = x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1])
    return x.mean(axis=0), np.where(std > 0, std, 1.0)


def stop_preprocess(
    train: np.ndarray, *others: np.ndarray, test_stats: TestStats = "own"
) -> list[np.ndarray]:
    """StoP's preprocessing of (N, D) ``train`` and each of ``others``, float32 (see the module
    docstring). The eigenvector columns are ordered by decreasing eigenvalue (StoP indexes the
    rows, ``v[argsort(e)]``: another orthogonal matrix, the same fit)."""
    z = np.asarray(train, dtype=np.float64)
    mean, std = _column_stats(z)
    z = (z - mean) / std
    evals, evecs = np.linalg.eigh(z.T @ z)
    rotation = evecs[:, np.argsort(evals)[::-1]]
    out = [z @ rotation]
    for x in others:
        x = np.asarray(x, dtype=np.float64)
        m, s = _column_stats(x) if test_stats == "own" else (mean, std)
        out.append(((x - m) / s) @ rotation)
    return [o.astype(np.float32) for o in out]


def preprocess(
    kind: Preprocess, train: np.ndarray, test: np.ndarray, test_stats: TestStats = "own"
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) (N, D) features after the ``kind`` preprocessing (module docstring)."""
    if kind == "msn":
        return msn_preprocess(train), msn_preprocess(test)
    if kind == "stop":
        fit, other = stop_preprocess(train, test, test_stats=test_stats)
        return fit, other
    fit, other = standardize(train, test)
    return fit, other


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    lambd: float,
    solver: Solver = "cyanure",
    tol: float = 1e-3,
    max_iter: int = 300,
    it0: int = 10,
    seed: int = 0,
    *,
    grad_tol: float = 1e-6,
    device: Optional[torch.device] = None,
    init: Optional[torch.Tensor] = None,
):
    """A fitted estimator with ``decision_function``: (N, C) class scores of (N, D) features.

    cyanure: ``lambda_1 = lambd / N``, ``max_iter`` epochs, the duality gap checked every ``it0``
    epochs, stopping at relative gap ``tol``. sklearn: ``C = 1 / lambd``, lbfgs to ``tol * 1e-3``
    and ``10 * max_iter`` iterations (docs/eval.md: the measured gap to cyanure). torch_lbfgs:
    ``softmax_lbfgs.fit_softmax_lbfgs`` on ``device`` from ``init`` (C, D) (a warm start), to the
    relative gradient norm ``grad_tol`` or ``10 * max_iter`` iterations."""
    if solver == "torch_lbfgs":
        from .softmax_lbfgs import fit_softmax_lbfgs

        return fit_softmax_lbfgs(x, y, lambd, grad_tol, 10 * max_iter, device, init)
    if solver == "sklearn":
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(C=1.0 / lambd, fit_intercept=False, tol=tol * 1e-3,
                                 max_iter=max_iter * 10, random_state=seed)  # fmt: skip
        return est.fit(x, y)
    try:
        from cyanure.estimators import Classifier
    except ImportError:
        raise ConfigError(
            "cyanure is not installed; pip install cyanure, or set logistic.solver=sklearn"
        ) from None
    est = Classifier(
        loss="multiclass-logistic", penalty="l2", lambda_1=lambd / len(x), fit_intercept=False,
        tol=tol, max_iter=max_iter, duality_gap_interval=it0, random_state=seed, verbose=False,
    )  # fmt: skip
    return _fit_quietly(est, x, y)


class CyanureNotice(UserWarning):
    """A line cyanure's C code printed on stderr during a fit (its float32 banner)."""


def _fit_quietly(est, x: np.ndarray, y: np.ndarray):
    """``est.fit(x, y)`` with what cyanure's C code prints on file descriptor 2 (the coloured
    "prone to numerical instability" banner of float32 features) turned into ``CyanureNotice``
    warnings, so that ``collected_warnings`` can count them like its ``ConvergenceWarning``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(err.fileno(), 2)
        try:
            est.fit(x, y)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        printed = err.read().decode(errors="replace")
    for w in caught:  # re-issued outside the redirection
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for line in printed.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).removeprefix("Warning :").strip()
        if line:
            warnings.warn(f"cyanure: {line}", CyanureNotice, stacklevel=3)
    return est


@contextlib.contextmanager
def collected_warnings(what: str) -> Iterator[None]:
    """Every warning raised inside (solver ``ConvergenceWarning``, ``CyanureNotice``, ...)
    logged as ONE line at the end, with the count of each distinct message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    counts = collections.Counter(
        f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught
    )
    if counts:
        logger.warning("%s: %d solver warning(s): %s", what, len(caught),
                       "; ".join(f"{n}x {m}" for m, n in counts.items()))  # fmt: skip


def class_scores(est, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) scores; classes absent from the training labels score -inf."""
    scores = np.full((len(x), num_classes), -np.inf, dtype=np.float64)
    scores[:, np.asarray(est.classes_, dtype=np.int64)] = est.decision_function(x)
    return scores


def fit_record(est, x: np.ndarray, y: np.ndarray, lambd: float, opt: LogisticSection) -> dict:
    """The convergence of one fit for ``settings.convergence``: the objective and the gradient's
    max-norm at the returned weights (float64, whatever the solver), iterations (cyanure:
    epochs) and whether the solver stopped on its own rule before its budget."""
    record = getattr(est, "convergence", None)
    if record is None:
        budget = opt.max_iter * (10 if opt.solver == "sklearn" else 1)
        iterations = int(np.max(np.asarray(est.n_iter_)))
        from .softmax_lbfgs import convergence_of

        record = {"solver": opt.solver, **convergence_of(x, y, est, lambd),
                  "iterations": iterations, "converged": iterations < budget}  # fmt: skip
    return {"lambd": float(lambd), **record}


def _fit(opt: LogisticSection, x, y, lambd: float, seed: int, device=None, init=None):
    """(estimator, ``fit_record``) of ``fit_logistic`` with ``opt``'s solver settings."""
    est = fit_logistic(x, y, lambd, opt.solver, opt.tol, opt.max_iter, opt.it0, seed,
                       grad_tol=opt.grad_tol, device=device, init=init)  # fmt: skip
    return est, fit_record(est, x, y, lambd, opt)


def sweep_lambda(
    x: np.ndarray,
    y: np.ndarray,
    opt: LogisticSection,
    num_classes: int,
    seed: int = 0,
    device: Optional[torch.device] = None,
) -> Optional[tuple[float, dict, list[dict], Optional[torch.Tensor]]]:
    """The ``lambd`` of ``opt.lambds()`` with the best top-1 on ``opt.held_out_fraction`` of each
    training class (never the test set; a tie goes to the smaller ``lambd``), ``{lambd:
    held-out top-1 %}``, each fit's ``fit_record`` and (torch_lbfgs) the best lambd's (C, D)
    weights; None when no class has two images (no held-out split). Each fit preprocesses its
    fit part as the training and its held-out part as the test features. The lambds run from
    the largest down, torch_lbfgs warm-started from the previous solution."""
    fit_idx, held_idx = held_out_split(y, opt.held_out_fraction, seed)
    if len(held_idx) == 0:
        return None
    x_fit, x_held = preprocess(opt.preprocess, x[fit_idx], x[held_idx], opt.stop_test_stats)
    accs, records, weights, init = {}, [], {}, None
    for lambd in progress(sorted(opt.lambds(), reverse=True), "logistic sweep", unit="fit"):
        est, record = _fit(opt, x_fit, y[fit_idx], lambd, seed, device, init)
        init = weights[float(lambd)] = getattr(est, "weights", None)
        records.append({"fit": "sweep", **record})
        pred = class_scores(est, x_held, num_classes).argmax(1)
        accs[float(lambd)] = 100.0 * float((pred == y[held_idx]).mean())
        logger.info("lambd=%g: held-out top-1 %.2f%%", lambd, accs[float(lambd)])
    best = max(accs, key=lambda k: (accs[k], -k))
    return best, {float(k): accs[float(k)] for k in opt.lambds()}, records, weights[best]


def choose_lambd(
    x: np.ndarray,
    y: np.ndarray,
    opt: LogisticSection,
    num_classes: int,
    seed: int,
    device: Optional[torch.device] = None,
) -> tuple[dict, Optional[torch.Tensor]]:
    """(``{"lambd_selected", "held_out_top1", "selection", "warnings", "convergence"}``, the
    sweep's weights at the selected lambd or None): the one given ``lambd``, the sweep's choice,
    or (no held-out split, e.g. one image per class) MSN's rule: the one
    ``opt.fallback_lambd``, with a warning."""
    lambds = opt.lambds()
    if len(lambds) == 1:
        return {"lambd_selected": float(lambds[0]), "held_out_top1": {}, "warnings": [],
                "selection": "none (one lambd)", "convergence": []}, None  # fmt: skip
    swept = sweep_lambda(x, y, opt, num_classes, seed, device)
    if swept is None:
        warning = (f"logistic.lambd: no class has two training images, so no held-out split to "
                   f"sweep {lambds} on; using logistic.fallback_lambd={opt.fallback_lambd:g} "
                   "(MSN's rule: one fixed lambd)")  # fmt: skip
        logger.warning(warning)
        return {"lambd_selected": float(opt.fallback_lambd), "held_out_top1": {},
                "selection": "fixed logistic.fallback_lambd (no held-out split)",
                "warnings": [warning], "convergence": []}, None  # fmt: skip
    return {"lambd_selected": swept[0], "held_out_top1": swept[1],
            "selection": f"held-out {opt.held_out_fraction:g} of the training subset",
            "warnings": [], "convergence": swept[2]}, swept[3]  # fmt: skip


def logistic_features(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    options: Optional[LogisticSection] = None,
    seed: int = 0,
    num_classes: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> tuple[dict[str, float], dict]:
    """(``{"top1": %, "top5": %}`` on the test features, the selection of ``choose_lambd`` with
    every fit's ``fit_record`` in ``"convergence"``) of the protocol ``options`` (default
    ``LogisticSection()``: MSN's) on (N, D) features and (N,) labels; torch_lbfgs runs on
    ``device`` (default CPU), its final fit warm-started from the sweep's solution."""
    opt = options or LogisticSection()
    x, y = np.asarray(x_train), np.asarray(y_train)
    if num_classes is None:
        num_classes = int(max(y.max(), np.max(y_test))) + 1
    with collected_warnings(f"logistic ({len(opt.lambds())} lambd, {opt.solver})"):
        selection, init = choose_lambd(x, y, opt, num_classes, seed, device)
        x_fit, x_eval = preprocess(opt.preprocess, x, np.asarray(x_test), opt.stop_test_stats)
        est, record = _fit(opt, x_fit, y, selection["lambd_selected"], seed, device, init)
    selection["convergence"].append({"fit": "final", **record})
    import torch

    from .metrics import topk_accuracy

    scores = torch.from_numpy(class_scores(est, x_eval, num_classes))
    acc = topk_accuracy(scores, torch.as_tensor(np.asarray(y_test)), (1, 5))
    return {"top1": acc[1], "top5": acc[5]}, selection


def logistic(
    encoder: torch.nn.Module,
    train_folder: str,
    val_folder: str,
    options: Optional[LogisticSection] = None,
    layers: str = "last",
    seed: int = 0,
    **data_options: Any,
) -> tuple[dict[str, float], dict]:
    """``logistic_features`` of ``encoder``'s features of two image folders (no cache, the
    whole training folder); ``data_options``: ``EvalDataSection`` fields (transform, batch)."""
    train, test = encode_folders(encoder, train_folder, val_folder, layers, data_options)
    return logistic_features(train.feats, train.labels, test.feats, test.labels, options,
                             seed=seed, num_classes=len(train.classes))  # fmt: skip


@dataclass
class LogisticConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: EvalDataSection = dataclasses.field(default_factory=EvalDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    subset: SubsetSection = dataclasses.field(default_factory=SubsetSection)
    logistic: LogisticSection = dataclasses.field(default_factory=LogisticSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def run(cfg: LogisticConfig) -> Optional[dict[str, float]]:
    """The protocol of ``cfg`` on cached features of the training subset; writes the run folder
    and returns the metrics (on the main rank; None on the others)."""
    lg = cfg.logistic
    settings = {
        "preprocess": lg.preprocess, "preprocessing": lg.preprocess_text(),
        "loss": "multiclass-logistic", "penalty": "l2", "intercept": False,
        "lambda_1": "lambd / n_train", "lambd": lg.lambds(), "fallback_lambd": lg.fallback_lambd,
        "solver": lg.solver, "tol": lg.tol, "max_iter": lg.max_iter, "it0": lg.it0,
        "grad_tol": lg.grad_tol,
        "subset": dataclasses.asdict(cfg.subset), "layers": cfg.features.layers,
    }  # fmt: skip
    if lg.preprocess == "stop":
        settings["stop_test_stats"] = lg.stop_test_stats
    dist_info = start_run(cfg, "logistic", settings)
    indices = subset_indices(cfg.data.train_folder, cfg.subset)
    train = split_features(cfg, cfg.data.train_folder, dist_info, indices)
    test = split_features(cfg, cfg.data.val_folder, dist_info)
    check_same_classes(train, test)
    if not dist_info.is_main:
        return None
    metrics, selection = logistic_features(train.feats, train.labels, test.feats, test.labels,
                                           lg, cfg.meta.seed, len(train.classes),
                                           dist_info.device)  # fmt: skip
    settings.update(selection, n_train=len(train.labels), n_test=len(test.labels),
                    **cache_settings(("train", train), ("test", test)))  # fmt: skip
    finish_run(cfg, dist_info, "logistic", metrics, settings)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.eval.logistic --fname logistic/digits [key=value ...]``."""
    return protocol_main(LogisticConfig, __doc__, lambda cfg, args: run(cfg), argv)


if __name__ == "__main__":
    raise SystemExit(main())
