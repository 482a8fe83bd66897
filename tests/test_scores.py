"""Influence scores against closed forms and actual leave-one-out retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_case

from influence_cli.config import SolverConfig, TrainConfig
from influence_cli.gradients import GradientSource
from influence_cli.scores import loss_change_if_removed, self_influence
from influence_cli.solvers import make_solver
from influence_cli.train import minimize


def _all_grads(case):
    return torch.cat([b.grads for b in GradientSource(case.problem).per_example(case.problem.train_loader)])


def test_ridge_hessian_is_closed_form():
    case = make_case("ridge", weight_decay=0.1, damping=0.01)
    x1 = torch.cat([case.x, torch.ones(len(case.x), 1, dtype=torch.float64)], 1)  # weight then bias
    closed = 2.0 / len(x1) * x1.T @ x1 + (0.1 + 0.01) * torch.eye(x1.shape[1], dtype=torch.float64)
    torch.testing.assert_close(GradientSource(case.problem).dense_hessian(), closed, rtol=1e-10, atol=1e-12)


def test_logreg_hessian_is_closed_form():
    case = make_case("logreg", classes=3, d=4, weight_decay=0.0, damping=0.0)
    model = case.problem.model
    p = torch.softmax(model(case.x), 1)
    n, d, c = len(case.x), case.x.shape[1], 3
    hw = torch.zeros(c * d + c, c * d + c, dtype=torch.float64)
    for i in range(n):
        lam = torch.diag(p[i]) - torch.outer(p[i], p[i])
        j = torch.cat([torch.kron(torch.eye(c, dtype=torch.float64), case.x[i][None]), torch.eye(c, dtype=torch.float64)], 1)
        hw += j.T @ lam @ j / n  # rows of W (c, d) flattened row-major, then the bias
    torch.testing.assert_close(GradientSource(case.problem).dense_hessian(), hw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["ridge", "logreg", "binary", "mlp"])
def test_self_influence_equals_explicit_inverse(kind):
    damping = 1.0 if kind == "mlp" else 0.01  # positive definite, so H^-1 is the plain inverse
    case = make_case(kind, damping=damping)
    grads = _all_grads(case)
    solver = make_solver(SolverConfig(name="direct", damping=damping)).fit(case.problem)
    h_inv = torch.linalg.inv(case.exact_hessian())
    expected = torch.einsum("ip,pq,iq->i", grads, h_inv, grads)
    torch.testing.assert_close(self_influence(grads, solver), expected, rtol=1e-8, atol=1e-12)
    assert (self_influence(grads, solver) >= 0).all()


def test_loss_change_formula_and_sign():
    case = make_case("logreg", damping=0.01)
    grads = _all_grads(case)
    solver = make_solver(SolverConfig(name="direct", damping=0.01)).fit(case.problem)
    h_inv = torch.linalg.inv(case.exact_hessian())
    got = loss_change_if_removed(solver.ihvp(grads[:3]), grads, len(grads))
    torch.testing.assert_close(got, grads[:3] @ h_inv @ grads.T / len(grads), rtol=1e-8, atol=1e-12)
    # a row's effect on its own loss: removing it raises its loss, so it is helpful to itself
    assert (torch.diagonal(got[:, :3]) > 0).all()


def _fit_to_optimum(case, exclude=None):
    model = case.problem.model
    for p in model.parameters():
        p.requires_grad_(True)
    result = minimize(model, list(model.parameters()), case.problem.objective, case.problem.train_loader,
                      case.problem.n, TrainConfig(optimizer="lbfgs", epochs=500, tol=1e-10), exclude=exclude)
    for p in model.parameters():
        p.requires_grad_(False)
    return result


@pytest.mark.slow
def test_loss_change_agrees_with_leave_one_out_retraining():
    """Koh & Liang's check on the worst-predicted test example: 15 top-|influence| plus 15 random
    training rows, each retrained to convergence; predicted vs actual change of its loss."""
    torch.manual_seed(0)
    case = make_case("logreg", n=150, d=6, classes=3, weight_decay=1e-2, damping=0.0)
    first = _fit_to_optimum(case)
    assert first.grad_norm < 1e-7
    theta0 = {k: v.clone() for k, v in case.problem.model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    x_pool = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y_pool = torch.randint(0, 3, (40,), generator=g)
    with torch.no_grad():
        worst = int(case.problem.objective.per_example_loss(case.problem.model(x_pool), y_pool).argmax())
    x_test, y_test = x_pool[worst : worst + 1], y_pool[worst : worst + 1]

    def test_loss():
        return float(case.problem.objective.per_example_loss(case.problem.model(x_test), y_test)[0])

    base = test_loss()
    grads = _all_grads(case)
    solver = make_solver(SolverConfig(name="direct", damping=0.0)).fit(case.problem)
    g_test = next(GradientSource(case.problem).per_example([(torch.tensor([0]), x_test, y_test)])).grads
    predicted = loss_change_if_removed(solver.ihvp(g_test), grads, case.problem.n)[0]
    top = predicted.abs().argsort(descending=True)[:15]
    rest = torch.tensor([r for r in torch.randperm(150, generator=g).tolist() if r not in set(top.tolist())][:15])
    rows = torch.cat([top, rest])
    actual = []
    for r in rows.tolist():
        exclude = torch.zeros(150, dtype=torch.bool)
        exclude[r] = True
        case.problem.model.load_state_dict(theta0)
        assert _fit_to_optimum(case, exclude).grad_norm < 1e-7
        actual.append(test_loss() - base)
    case.problem.model.load_state_dict(theta0)
    pred = predicted[rows].numpy()
    actual = np.array(actual)
    pearson = np.corrcoef(pred, actual)[0, 1]
    print(f"worst-predicted test example: Pearson {pearson:.4f} over {len(rows)} retrained rows")
    assert len(rows) == 30 and pearson >= 0.95, pearson
    np.testing.assert_allclose(pred, actual, rtol=0.3, atol=2e-3)  # same scale, not only correlated


