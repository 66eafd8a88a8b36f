"""Full-batch L-BFGS for l2-regularised multinomial logistic regression, in torch (CPU or GPU).

The objective is cyanure's ``multiclass-logistic`` + ``l2`` without intercept,
``f(W) = (1/N) sum_i CE(W x_i, y_i) + (lambda_1 / 2) ||W||_F^2``, with the protocol's
``lambda_1 = lambd / N`` (so ``N f = sum_i CE + (lambd / 2) ||W||^2``: sklearn's ``C = 1 / lambd``).
It is strictly convex, so every solver that converges reaches the same ``W``. The arithmetic
is float64 on every device: the stopping rule is a gradient norm far below float32's
resolution of the loss at lambd/N ~ 1e-8, and float64 matmuls are fast enough on CPUs and
data-centre GPUs at the protocol's sizes (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def objective_and_grad(
    x: torch.Tensor, target: torch.Tensor, w: torch.Tensor, lambda_1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``f(W)``, ``grad f(W)`` (C, D)) for features (N, D), class indices (N,), weights (C, D)."""
    scores = x @ w.T
    prob = torch.softmax(scores, dim=1)
    f = F.cross_entropy(scores, target) + 0.5 * lambda_1 * (w * w).sum()
    prob[torch.arange(len(target), device=x.device), target] -= 1.0
    return f, prob.T @ x / len(target) + lambda_1 * w


def _problem(x: np.ndarray, y: np.ndarray, device: torch.device):
    """(classes (C,), float64 features (N, D), class indices (N,)) on ``device``."""
    classes, idx = np.unique(np.asarray(y), return_inverse=True)
    xt = torch.as_tensor(np.asarray(x), device=device).to(torch.float64)
    return classes, xt, torch.as_tensor(idx, device=device)


def _grad_at_zero(x: torch.Tensor, target: torch.Tensor, classes: int, lambda_1: float) -> float:
    """``max|grad f(0)|``: the scale of the relative stopping rule."""
    zero = torch.zeros(classes, x.shape[1], dtype=torch.float64, device=x.device)
    return objective_and_grad(x, target, zero, lambda_1)[1].abs().max().item()


class SoftmaxLBFGS:
    """A fitted model with sklearn's interface (``classes_``, ``coef_`` (C, D),
    ``decision_function``) and ``convergence``: the final objective, gradient norms and
    iterations."""

    def __init__(self, classes: np.ndarray, coef: torch.Tensor, convergence: dict):
        self.classes_, self.weights, self.convergence = classes, coef, convergence
        self.coef_ = coef.cpu().numpy()

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """(N, C) class scores of (N, D) features."""
        return np.asarray(x, dtype=np.float64) @ self.coef_.T


def fit_softmax_lbfgs(
    x: np.ndarray,
    y: np.ndarray,
    lambd: float,
    grad_tol: float = 1e-6,
    max_iter: int = 3000,
    device: Optional[torch.device] = None,
    init: Optional[torch.Tensor] = None,
    history: int = 20,
) -> SoftmaxLBFGS:
    """Minimise ``f`` (module docstring, ``lambda_1 = lambd / N``) over (C, D) weights from
    ``init`` (a warm start, e.g. the solution at a larger lambd; zeros if None) with
    ``torch.optim.LBFGS`` (strong-Wolfe line search), stopping when ``||grad f||_inf <=
    grad_tol * ||grad f(0)||_inf`` (scale-free) or after ``max_iter`` iterations."""
    device = device or torch.device("cpu")
    classes, xt, target = _problem(x, y, device)
    lambda_1 = lambd / len(xt)
    g0 = _grad_at_zero(xt, target, len(classes), lambda_1)
    if init is None:
        w = torch.zeros(len(classes), xt.shape[1], dtype=torch.float64, device=device)
    else:
        w = init.to(device, torch.float64).clone()
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=grad_tol * g0, tolerance_change=0.0,
                            history_size=history, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        f, g = objective_and_grad(xt, target, w.detach(), lambda_1)
        w.grad = g
        return f

    opt.step(closure)
    state = opt.state[w]
    w = w.detach()
    f, g = objective_and_grad(xt, target, w, lambda_1)
    grad = g.abs().max().item()
    convergence = {
        "solver": "torch_lbfgs", "objective": f.item(), "grad_inf": grad,
        "grad_inf_relative": grad / g0 if g0 > 0 else 0.0, "grad_tol": grad_tol,
        "iterations": int(state.get("n_iter", 0)), "evaluations": int(state.get("func_evals", 0)),
        "converged": grad <= grad_tol * g0, "dtype": "float64", "device": device.type,
        "warm_start": init is not None,
    }  # fmt: skip
    return SoftmaxLBFGS(classes, w, convergence)


def convergence_of(x: np.ndarray, y: np.ndarray, est, lambd: float) -> dict:
    """``{"objective", "grad_inf", "grad_inf_relative"}`` of any fitted estimator with
    ``classes_`` and ``coef_`` ((C, D); cyanure's is (D, C)) on (N, D) features, float64."""
    classes, xt, target = _problem(x, y, torch.device("cpu"))
    w = torch.as_tensor(np.asarray(est.coef_, dtype=np.float64))
    w = w.T if type(est).__module__.startswith("cyanure") else w
    lambda_1 = lambd / len(xt)
    f, g = objective_and_grad(xt, target, w, lambda_1)
    g0 = _grad_at_zero(xt, target, len(classes), lambda_1)
    grad = g.abs().max().item()
    return {"objective": f.item(), "grad_inf": grad,
            "grad_inf_relative": grad / g0 if g0 > 0 else 0.0}  # fmt: skip
