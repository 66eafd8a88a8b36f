"""Multinomial logistic regression on frozen features (the MSN / StoP low-shot protocol).

Features standardised with the training subset's statistics; cyanure's multiclass-logistic, l2,
no intercept, ``lambda_1 = lambd / n_train``; a list of ``lambd`` is swept on a held-out part of
the training subset (never the test set), then the best is refit on the whole subset.

    python logistic_eval.py --fname configs/logistic/digits.yaml [section.key=value ...]
    python logistic_eval.py --fname ... subset.file=1percent.txt "logistic.lambd=[0.0001,0.001]"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from ijepa_toolkit.config import (
    EncoderSection,
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
    require,
)
from ijepa_toolkit.data.subsets import SubsetSection
from ijepa_toolkit.eval.features import EvalDataSection, FeaturesSection
from ijepa_toolkit.eval.frozen import (
    check_same_classes,
    finish_run,
    run_cli,
    split_features,
    start_run,
    subset_indices,
)
from ijepa_toolkit.eval.knn import topk_accuracy
from ijepa_toolkit.eval.logistic import (
    SOLVERS,
    class_scores,
    fit_logistic,
    standardize,
    sweep_lambda,
)


@dataclass
class LogisticSection:
    lambd: Union[float, list[float]] = 0.00025  # divided by n_train; a list is swept
    solver: str = "cyanure"  # cyanure | sklearn (same objective)
    held_out_fraction: float = 0.2  # of each class of the training subset, for the sweep
    tol: float = 1e-3
    max_iter: int = 300


@dataclass
class LogisticConfig:
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    data: EvalDataSection = dataclasses.field(default_factory=EvalDataSection)
    model: EncoderSection = dataclasses.field(default_factory=EncoderSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    subset: SubsetSection = dataclasses.field(default_factory=SubsetSection)
    logistic: LogisticSection = dataclasses.field(default_factory=LogisticSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def run(cfg: LogisticConfig) -> None:
    lambds = cfg.logistic.lambd if isinstance(cfg.logistic.lambd, list) else [cfg.logistic.lambd]
    lg = cfg.logistic
    require([
        ("logistic.lambd", lg.lambd, bool(lambds) and min(lambds) > 0, "> 0 (or a list of such)"),
        ("logistic.solver", lg.solver, lg.solver in SOLVERS, f"one of {SOLVERS}"),
        ("logistic.held_out_fraction", lg.held_out_fraction, 0 < lg.held_out_fraction < 1,
         "between 0 and 1"),
        ("logistic.max_iter", lg.max_iter, lg.max_iter >= 1, ">= 1"),
    ])  # fmt: skip
    settings = {
        "standardize": "train-subset mean/std, both splits", "loss": "multiclass-logistic",
        "penalty": "l2", "intercept": False, "lambda_1": "lambd / n_train", "lambd": lambds,
        "solver": lg.solver, "tol": lg.tol, "max_iter": lg.max_iter,
        "subset": dataclasses.asdict(cfg.subset), "layers": cfg.features.layers,
        "selection": f"held-out {lg.held_out_fraction:g} of the training subset"
        if len(lambds) > 1 else "none (one lambd)",
    }  # fmt: skip
    dist_info = start_run(cfg, "logistic", settings)
    indices = subset_indices(cfg.data.train_folder, cfg.subset)
    train = split_features(cfg, cfg.data.train_folder, dist_info, indices)
    test = split_features(cfg, cfg.data.val_folder, dist_info)
    check_same_classes(train, test)
    if not dist_info.is_main:
        return
    x, y, num_classes = np.asarray(train.feats), train.labels, len(train.classes)
    fit_kwargs = {"solver": lg.solver, "tol": lg.tol, "max_iter": lg.max_iter}
    lambd, sweep = lambds[0], {}
    if len(lambds) > 1:
        lambd, sweep = sweep_lambda(x, y, lambds, num_classes, lg.held_out_fraction,
                                    cfg.meta.seed, **fit_kwargs)  # fmt: skip
    x_train, x_test = standardize(x, test.feats)
    est = fit_logistic(x_train, y, lambd, seed=cfg.meta.seed, **fit_kwargs)
    scores = torch.from_numpy(class_scores(est, x_test, num_classes))
    acc = topk_accuracy(scores, torch.from_numpy(test.labels), (1, 5))
    settings.update(lambd_selected=lambd, held_out_top1=sweep, n_train=len(y),
                    n_test=len(test.labels), feature_cache=str(train.path.parent),
                    cache_reused={"train": train.reused, "test": test.reused})  # fmt: skip
    finish_run(cfg, dist_info, "logistic", {"top1": acc[1], "top5": acc[5]}, settings)


def main(argv=None) -> None:
    cfg, _ = parse_config(LogisticConfig, config_parser(__doc__), argv)
    run_cli(lambda: run(cfg))


if __name__ == "__main__":
    main()
