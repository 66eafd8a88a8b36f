"""Logistic regression protocols against references written from the upstream scripts:
MSN facebookresearch/msn@4388dc1eadbe3042b85d3296d41b9b207656e043 ``logistic_eval.py`` and StoP
amirbar/StoP@72206b3e0dc17934f590fcb90ed6e4569d60b043 ``logistic_eval.py``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ijepa_toolkit.eval import logistic as lg
from ijepa_toolkit.eval.softmax_lbfgs import objective_and_grad


def blobs(n_per_class: int, classes: int = 5, dim: int = 12, seed: int = 0):
    """Gaussian class blobs with a large common offset and uneven column scales (features of a
    frozen encoder look like this: a big shared mean, a small spread)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + 0.8 * rng.normal(size=(len(y), dim))
    return (5.0 + x * rng.uniform(0.2, 3.0, size=dim)).astype(np.float32), y


def objective(est, x: np.ndarray, y: np.ndarray, lambd: float) -> float:
    """``mean_i CE(W x_i, y_i) + (lambd / N) / 2 ||W||^2``: the objective both solvers minimise."""
    w = np.asarray(est.coef_, dtype=np.float64)
    w = w if w.shape[0] == len(est.classes_) else w.T
    s = x.astype(np.float64) @ w.T
    s -= s.max(axis=1, keepdims=True)
    loss = np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]
    return float(loss.mean() + 0.5 * lambd / len(x) * (w**2).sum())


def test_msn_preprocessing_and_solver_are_msns():
    """MSN: ``cyan.preprocess(embs, normalize=True, columns=False, centering=True)`` on train and
    test separately, ``MultiClassifier(...).fit(lambd=lambd / N, it0=10, tol=1e-3,
    max_epochs=300)``; the protocol's default must reproduce that fit exactly."""
    data_processing = pytest.importorskip("cyanure.data_processing")
    from cyanure.estimators import Classifier

    x_tr, y_tr = blobs(30)
    x_te, y_te = blobs(20, seed=1)
    ref_tr, ref_te = np.array(x_tr), np.array(x_te)
    for x in (ref_tr, ref_te):  # in place, rows: centre, then L2-normalise
        data_processing.preprocess(x, centering=True, normalize=True, columns=False)
    ours_tr, ours_te = lg.preprocess("msn", x_tr, x_te)
    np.testing.assert_allclose(ours_tr, ref_tr, atol=1e-6)
    np.testing.assert_allclose(ours_te, ref_te, atol=1e-6)
    clf = Classifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False,
                     lambda_1=0.01 / len(x_tr), tol=1e-3, max_iter=300,
                     duality_gap_interval=10, random_state=0, verbose=False)  # fmt: skip
    direct = 100.0 * (clf.fit(ref_tr, y_tr).predict(ref_te) == y_te).mean()
    metrics, selection = lg.logistic_features(
        x_tr, y_tr, x_te, y_te, lg.LogisticSection(lambd=0.01)
    )
    assert metrics["top1"] == pytest.approx(direct, abs=1e-9)
    assert selection["lambd_selected"] == 0.01 and lg.LogisticSection().preprocess == "msn"


def stop_reference(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """StoP's lines: ``embs -= embs.mean(0); embs /= embs.std(0)`` (torch: unbiased), the
    eigenvectors of ``embs.T @ embs`` indexed as StoP does (``v[argsort(e, descending)]``, rows),
    ``embs @ v``; the test features standardised with their own mean/std, ``@ v``."""
    embs, test_embs = (
        torch.tensor(train, dtype=torch.float64),
        torch.tensor(test, dtype=torch.float64),
    )
    embs = (embs - embs.mean(dim=0)) / embs.std(dim=0)
    e, v = torch.linalg.eigh(embs.T @ embs)
    v = v[torch.argsort(e, descending=True)]
    test_embs = (test_embs - test_embs.mean(dim=0)) / test_embs.std(dim=0)
    return embs @ v, test_embs @ v


def test_stop_preprocessing_is_stops_up_to_a_rotation():
    x_tr, _ = blobs(30)
    x_te, _ = blobs(20, seed=1)
    x_te = x_te * 1.5 + 2.0  # a test set with other statistics: StoP's own-statistics quirk shows
    ref_tr, ref_te = (t.numpy() for t in stop_reference(x_tr, x_te))
    ours_tr, ours_te = lg.preprocess("stop", x_tr, x_te)
    # an l2 fit without intercept depends on the features through their inner products only
    np.testing.assert_allclose(ours_tr @ ours_tr.T, ref_tr @ ref_tr.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ours_te @ ours_tr.T, ref_te @ ref_tr.T, rtol=1e-4, atol=1e-3)
    _, with_train_stats = lg.preprocess("stop", x_tr, x_te, test_stats="train")
    assert np.abs(with_train_stats @ ours_tr.T - ref_te @ ref_tr.T).max() > 1.0


def test_a_rotation_leaves_the_l2_fit_unchanged():
    x_tr, y_tr = blobs(30)
    x_te, _ = blobs(20, seed=1)
    z_tr, z_te = lg.standardize(x_tr, x_te, eps=0.0)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(12, 12)))
    plain = lg.fit_logistic(z_tr, y_tr, 0.1, "sklearn").decision_function(z_te)
    rotated = lg.fit_logistic(z_tr @ q, y_tr, 0.1, "sklearn").decision_function(z_te @ q)
    np.testing.assert_allclose(rotated, plain, atol=2e-2)  # lbfgs stops at its tolerance
    assert (rotated.argmax(1) == plain.argmax(1)).all()


@pytest.mark.parametrize("lambd", [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1])
def test_sklearn_reaches_cyanures_optimum(lambd):
    """cyanure stops at a relative duality gap of 1e-3, so its objective is within 1e-3 of the
    optimum: the sklearn fallback's must be within that of cyanure's (MSN preprocessing)."""
    pytest.importorskip("cyanure")
    x_tr, y_tr = blobs(40)
    x, _ = lg.preprocess("msn", x_tr, x_tr)
    f_cy = objective(lg.fit_logistic(x, y_tr, lambd, "cyanure"), x, y_tr, lambd)
    f_sk = objective(lg.fit_logistic(x, y_tr, lambd, "sklearn"), x, y_tr, lambd)
    assert abs(f_sk - f_cy) <= 1e-3 * f_cy


def test_one_image_per_class_uses_the_fixed_fallback_lambd(caplog):
    """MSN's rule is one fixed lambd; with one image per class no held-out split exists (today's
    sweep fitted and scored an empty held-out part: IndexError in cyanure)."""
    x_tr, y_tr = blobs(1)
    x_te, y_te = blobs(10, seed=1)
    opt = lg.LogisticSection(lambd=[0.001, 0.1], fallback_lambd=0.01, solver="sklearn")
    with caplog.at_level(logging.WARNING, logger="ijepa_toolkit"):
        metrics, selection = lg.logistic_features(x_tr, y_tr, x_te, y_te, opt)
    assert selection["lambd_selected"] == 0.01 and selection["held_out_top1"] == {}
    assert "fallback_lambd=0.01" in selection["warnings"][0] and "fallback_lambd" in caplog.text
    single = lg.LogisticSection(lambd=0.01, solver="sklearn")
    assert metrics == lg.logistic_features(x_tr, y_tr, x_te, y_te, single)[0]


def msn_blobs(n_per_class: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = blobs(n_per_class, seed=seed)
    return lg.msn_preprocess(x).astype(np.float64), y


@pytest.mark.parametrize("lambd", [0.01, 0.1])
def test_torch_lbfgs_reaches_cyanures_optimum(lambd):
    """The objective is strictly convex: cyanure run to a relative duality gap of 1e-8 (many
    epochs) and torch_lbfgs must find the same optimum and the same predictions."""
    pytest.importorskip("cyanure")
    x, y = msn_blobs()
    cy = lg.fit_logistic(x, y, lambd, "cyanure", tol=1e-8, max_iter=5000)
    ours = lg.fit_logistic(x, y, lambd, "torch_lbfgs", grad_tol=1e-8)
    f_cy, f_ours = objective(cy, x, y, lambd), objective(ours, x, y, lambd)
    assert abs(f_ours - f_cy) <= 1e-4 * f_cy
    assert ours.convergence["objective"] == pytest.approx(f_ours, rel=1e-12)
    assert (ours.decision_function(x).argmax(1) == cy.decision_function(x).argmax(1)).all()
    default = lg.fit_logistic(x, y, lambd, "cyanure")  # the protocol's tol 1e-3: within that
    assert objective(default, x, y, lambd) - f_ours <= 1e-3 * f_ours


def test_the_reported_gradient_is_the_objectives():
    """``objective_and_grad``'s closed-form gradient against autograd of ``objective``'s formula."""
    x, y = msn_blobs(10)
    w = torch.randn(5, x.shape[1], dtype=torch.float64, requires_grad=True)
    xt = torch.as_tensor(x)
    s = xt @ w.T
    f = (torch.logsumexp(s, 1) - s[torch.arange(len(y)), torch.as_tensor(y)]).mean()
    (f + 0.5 * 0.3 / len(x) * (w**2).sum()).backward()
    ours_f, ours_g = objective_and_grad(xt, torch.as_tensor(y), w.detach(), 0.3 / len(x))
    torch.testing.assert_close(ours_g, w.grad)
    assert ours_f.item() == pytest.approx(f.item() + 0.5 * 0.3 / len(x) * (w**2).sum().item())


def test_warm_start_gives_the_same_optimum_in_fewer_iterations():
    x, y = msn_blobs()
    cold = lg.fit_logistic(x, y, 0.01, "torch_lbfgs", grad_tol=1e-8)
    start = lg.fit_logistic(x, y, 1.0, "torch_lbfgs", grad_tol=1e-8).weights
    warm = lg.fit_logistic(x, y, 0.01, "torch_lbfgs", grad_tol=1e-8, init=start)
    assert warm.convergence["warm_start"] and not cold.convergence["warm_start"]
    f_cold, f_warm = cold.convergence["objective"], warm.convergence["objective"]
    assert abs(f_warm - f_cold) <= 1e-8 * f_cold
    assert warm.convergence["iterations"] < cold.convergence["iterations"]
    assert (warm.decision_function(x).argmax(1) == cold.decision_function(x).argmax(1)).all()


@pytest.mark.parametrize("solver", ["torch_lbfgs", "sklearn"])
def test_every_fit_records_its_convergence(solver):
    """``settings.convergence``: one record per sweep fit (largest lambd first, warm-started)
    and the final refit, with the objective and gradient norm at the returned weights."""
    x_tr, y_tr = blobs(30)
    x_te, y_te = blobs(20, seed=1)
    opt = lg.LogisticSection(lambd=[0.001, 0.1], solver=solver)
    metrics, selection = lg.logistic_features(x_tr, y_tr, x_te, y_te, opt)
    records = selection["convergence"]
    assert [(r["fit"], r["lambd"]) for r in records] == [
        ("sweep", 0.1),
        ("sweep", 0.001),
        ("final", selection["lambd_selected"]),
    ]
    assert all(r["converged"] and r["solver"] == solver for r in records)
    assert list(selection["held_out_top1"]) == [0.001, 0.1]  # the configured order
    if solver == "torch_lbfgs":
        assert [r["warm_start"] for r in records] == [False, True, True]
        assert all(r["grad_inf_relative"] <= opt.grad_tol for r in records)
    assert 0.0 <= metrics["top1"] <= 100.0
