"""A direct solver moved to another damping without a pass over the data equals a fresh fit there."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_case

from influence_cli.config import SolverConfig
from influence_cli.solvers import make_solver
from influence_cli.solvers.redamp import redamped


@pytest.mark.parametrize("kind", ["ridge", "logreg", "mlp"])
@pytest.mark.parametrize("new", [1e-4, 0.1])
def test_redamped_direct_equals_a_fresh_fit(kind, new):
    case = make_case(kind, damping=1e-2, hessian="gauss_newton")
    solver = make_solver(SolverConfig(name="direct", damping=1e-2)).fit(case.problem)
    moved = redamped(solver, new, replace(case.problem, damping=new))
    fresh = make_solver(SolverConfig(name="direct", damping=new)).fit(replace(case.problem, damping=new))
    v = torch.randn(4, case.problem.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moved.ihvp(v), fresh.ihvp(v), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(moved.half_ihvp(v).square().sum(1), fresh.half_ihvp(v).square().sum(1), rtol=1e-8,
                               atol=1e-10)
    assert moved.describe()["damping"] == new and moved.config.damping == new
    assert moved.describe()["eig_min"] == pytest.approx(fresh.describe()["eig_min"], rel=1e-6, abs=1e-9)


def test_solvers_without_an_exact_shift_ask_for_a_refit():
    case = make_case("logreg", damping=1e-2)
    solver = make_solver(SolverConfig(name="cg", damping=1e-2)).fit(case.problem)
    assert redamped(solver, 0.1, case.problem) is None
