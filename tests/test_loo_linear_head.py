"""The output-Linear-layer fast paths (gradients.OutputHead) against the generic ones, in float64: the Newton
leave-one-out kernels from the direct solver's inverse (signals._head_kernels) against per-row Jacobians and
half-solves, the block-symmetric output-layer Hessian against autograd, and DirectSolver.inverse against ihvp."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_case
from torch import nn

from influence_cli.config import SolverConfig
from influence_cli.gradients import GradientSource, linear_head_hessian, output_head
from influence_cli.objective import ParamSpace
from influence_cli.signals import loo_loss
from influence_cli.solvers import make_solver


class FactoredOnly:
    """The direct solver seen through half_ihvp and ihvp alone: loo_loss then takes the Jacobian path."""

    name = "direct"

    def __init__(self, solver) -> None:  # noqa: ANN001
        self.solver = solver

    def ihvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.solver.ihvp(v)

    def half_ihvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.solver.half_ihvp(v)


def head_case(kind: str, params, classes: int = 3):  # noqa: ANN001
    case = make_case(kind, n=37, classes=classes, batch_size=16, damping=1e-2)
    problem = replace(case.problem, params=ParamSpace.select(case.problem.model, params))
    return replace(case, problem=problem)


def binary_mlp_case():
    case = make_case("mlp", n=37, classes=1, damping=1e-2)
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(37, generator=g) > 0.5).double()
    loader = type(case.problem.train_loader)(case.x, y, 16)
    objective = replace(case.problem.objective, task="binary")
    problem = replace(case.problem, objective=objective, train_loader=loader,
                      params=ParamSpace.select(case.problem.model, "last_layer"))
    return replace(case, problem=problem, y=y)


CASES = {
    "logreg": lambda: head_case("logreg", "all", classes=4),
    "binary": lambda: head_case("binary", "all"),
    "ridge": lambda: head_case("ridge", "all"),
    "mlp_last_layer": lambda: head_case("mlp", "last_layer", classes=4),
    "mlp_last_layer_binary": binary_mlp_case,
    "mlp_weight_only": lambda: head_case("mlp", ("2.weight",)),
    "mlp_bias_only": lambda: head_case("mlp", ("2.bias",)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_head_kernels_match_the_jacobian_path(name):
    case = CASES[name]()
    assert output_head(case.problem) is not None
    solver = make_solver(SolverConfig(name="direct", damping=1e-2)).fit(case.problem)
    fast = loo_loss(case.problem, solver)
    slow = loo_loss(case.problem, FactoredOnly(solver))
    for field in ("loo_loss", "loo_loss_first_order", "loss", "self_influence", "leverage", "outputs", "loo_outputs"):
        a, b = getattr(fast, field), getattr(slow, field)
        assert a.shape == b.shape and np.isfinite(a).all(), field
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=field)
    assert fast.capped == slow.capped


def test_head_kernels_in_eigen_mode():
    """A solver holding eigenpairs (|A|^-1) gives the same kernels through inverse() as through half_ihvp."""
    case = CASES["logreg"]()
    fitted = make_solver(SolverConfig(name="direct", damping=1e-2)).fit(case.problem)
    values, vectors = torch.linalg.eigh(fitted.inverse().inverse())
    state = {"chol": None, "eig_values": values, "eig_vectors": vectors, "info": {}}
    solver = make_solver(SolverConfig(name="direct", damping=1e-2)).load_state(state, case.problem)
    fast, slow = loo_loss(case.problem, solver), loo_loss(case.problem, FactoredOnly(solver))
    np.testing.assert_allclose(fast.loo_loss, slow.loo_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fast.self_influence, slow.self_influence, rtol=1e-10, atol=1e-12)


def test_not_a_head_takes_the_jacobian_path():
    """All of an MLP's parameters: no output head, the Jacobian path is used and inverse() is never called."""
    case = make_case("mlp", n=20)
    assert output_head(case.problem) is None

    class Refuses(FactoredOnly):
        def inverse(self) -> torch.Tensor:
            raise AssertionError("inverse() called without an output head")

    solver = make_solver(SolverConfig(name="direct", damping=1e-3)).fit(case.problem)
    res = loo_loss(case.problem, Refuses(solver))
    assert np.isfinite(res.loo_loss).all()


def test_head_in_reverse_order_is_not_a_head():
    """The (class, input) permutation assumes ParamSpace order weight, bias: any other order is refused."""
    case = head_case("logreg", "all")
    problem = replace(case.problem, params=ParamSpace(("bias", "weight"), (torch.Size([3]), torch.Size([3, 5]))))
    assert output_head(problem) is None


@pytest.mark.parametrize("name", ["logreg", "binary", "ridge"])
def test_head_hessian_matches_autograd(name):
    case = CASES[name]()
    hess = linear_head_hessian(GradientSource(case.problem), torch.float64, None)
    torch.testing.assert_close(hess, case.exact_hessian(), rtol=1e-12, atol=1e-13)  # its loss includes wd
    assert torch.equal(hess, hess.T)


@pytest.mark.parametrize("name", ["mlp_last_layer", "mlp_last_layer_binary", "mlp_weight_only", "mlp_bias_only"])
def test_head_hessian_matches_hvps(name):
    case = CASES[name]()
    source = GradientSource(case.problem)
    eye = torch.eye(case.problem.params.size, dtype=torch.float64)
    torch.testing.assert_close(linear_head_hessian(source, torch.float64, None), source.hvp(eye),
                               rtol=1e-12, atol=1e-13)


def test_head_hessian_regression_with_several_outputs():
    """Squared error over k outputs: Lambda = (2/k) I, only the diagonal blocks."""
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(4, 3).double().eval().requires_grad_(False)
    case = make_case("ridge", n=30, d=4)
    y = torch.randn(30, 3, generator=g, dtype=torch.float64)
    loader = type(case.problem.train_loader)(case.x[:, :4], y, 8)
    problem = replace(case.problem, model=model, train_loader=loader, n=30, params=ParamSpace.select(model, "all"))
    source = GradientSource(problem)
    eye = torch.eye(problem.params.size, dtype=torch.float64)
    torch.testing.assert_close(linear_head_hessian(source, torch.float64, None), source.hvp(eye),
                               rtol=1e-12, atol=1e-13)


def test_direct_inverse_is_what_ihvp_applies():
    case = CASES["mlp_last_layer"]()
    solver = make_solver(SolverConfig(name="direct", damping=1e-2)).fit(case.problem)
    eye = torch.eye(case.problem.params.size, dtype=torch.float64)
    inverse = solver.inverse()
    torch.testing.assert_close(inverse, solver.ihvp(eye), rtol=1e-10, atol=1e-12)
    assert torch.equal(inverse, inverse.T)


def test_a_head_with_an_inverted_solver_uses_the_inverse():
    case = CASES["logreg"]()
    solver = make_solver(SolverConfig(name="direct", damping=1e-2)).fit(case.problem)
    calls = []

    class Counting(FactoredOnly):
        def inverse(self) -> torch.Tensor:
            calls.append(1)
            return self.solver.inverse()

    loo_loss(case.problem, Counting(solver))
    assert calls == [1]
