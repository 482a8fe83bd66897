"""Solver contract suite (sklearn style): every solver in SOLVERS runs every check."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case

from influence_cli.config import CGConfig, LissaConfig, SolverConfig
from influence_cli.errors import ConfigError, NotFittedError
from influence_cli.solvers import SOLVERS, Factored, MemoryChecked, RowScorer, Stateful, make_solver

TOL = {"direct": dict(rtol=1e-8, atol=1e-10), "ekfac": dict(rtol=1e-8, atol=1e-10), "arnoldi": dict(rtol=1e-6, atol=1e-8), "cg": dict(rtol=1e-6, atol=1e-8), "lissa": dict(rtol=2e-2, atol=2e-3)}
# per-solver settings for the contract: tolerances tight enough for TOL (the forward error of an
# iterative solve is up to condition number x residual); lissa with full-data steps (deterministic)
SETTINGS = {"cg": dict(cg=CGConfig(tol=1e-10)), "lissa": dict(lissa=LissaConfig(batch_size=10**9, tol=1e-4))}
# ekfac's ihvp takes a fixed number of preconditioned CG steps (solver.ekfac.refine, default 2), whose step sizes
# depend on v: linear only up to each solve's remaining error (measured <= 0.3% of max |ihvp| on these cases)
LINEAR_TOL = {**TOL, "ekfac": dict(rtol=2e-2, atol=0.2)}


def _v(case, k=3, seed=0):
    return torch.randn(k, case.problem.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def check_fit_returns_self(solver, case):
    assert solver.fit(case.problem) is solver


def check_unfitted_raises(solver, case):
    with pytest.raises(NotFittedError):
        solver.ihvp(_v(case))


def check_matches_explicit_solve(solver, case):
    if solver.name == "ekfac" and not (isinstance(case.problem.model, torch.nn.Linear)
                                       and case.problem.objective.task == "regression"):
        pytest.skip("EK-FAC is exact only for one Linear layer with MSE loss (tests/test_ekfac.py covers the rest)")
    v = _v(case)
    expected = torch.linalg.solve(case.exact_hessian(), v.T).T
    torch.testing.assert_close(solver.fit(case.problem).ihvp(v), expected, **TOL[solver.name])


def check_linear_in_v(solver, case):
    solver.fit(case.problem)
    a, b = _v(case, 2, seed=1)
    combo = solver.ihvp((2.0 * a - 3.0 * b)[None])[0]
    torch.testing.assert_close(combo, 2.0 * solver.ihvp(a[None])[0] - 3.0 * solver.ihvp(b[None])[0],
                               **LINEAR_TOL[solver.name])


def check_batched_shape(solver, case):
    solver.fit(case.problem)
    v = _v(case, 5)
    out = solver.ihvp(v)
    assert out.shape == v.shape
    torch.testing.assert_close(out[2], solver.ihvp(v[2:3])[0], **TOL[solver.name])


def check_half_ihvp_squares_to_ihvp(solver, case):
    if not isinstance(solver, Factored):
        pytest.skip("not a factored solver")
    solver.fit(case.problem)
    v = _v(case, 4)
    quad = solver.half_ihvp(v).square().sum(1)
    ihvp = getattr(solver, "factored_ihvp", solver.ihvp)  # ekfac, arnoldi: half_ihvp is the factored form, no refine
    torch.testing.assert_close(quad, (v * ihvp(v)).sum(1), **TOL[solver.name])


def check_describe_is_plain(solver, case):
    import json

    json.dumps(solver.fit(case.problem).describe())


CHECKS = [check_fit_returns_self, check_unfitted_raises, check_matches_explicit_solve, check_linear_in_v,
          check_batched_shape, check_half_ihvp_squares_to_ihvp, check_describe_is_plain]


@pytest.mark.parametrize("kind", ["ridge", "logreg", "mlp"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_solver_contract(check, name, kind):
    damping = 1.0 if kind == "mlp" else 0.05  # enough to make the MLP's exact Hessian positive definite
    case = make_case(kind, damping=damping)
    assert torch.linalg.eigvalsh(case.exact_hessian()).min() > 0
    check(make_solver(SolverConfig(name=name, damping=damping, **SETTINGS.get(name, {}))), case)


def test_direct_falls_back_to_eigen_when_not_positive_definite():
    case = make_case("mlp", damping=0.0, weight_decay=1e-2, d=4, classes=3)  # indefinite, no ~0 eigenvalues
    exact = case.exact_hessian()
    values, vectors = torch.linalg.eigh(exact)
    assert values.min() < 0, "the fixture must be indefinite for this test to mean anything"
    solver = make_solver(SolverConfig(name="direct", damping=0.0)).fit(case.problem)
    info = solver.describe()
    assert info["factorization"] == "eigen"
    floor = 1e-10 * values.abs().max()
    assert info["negative_eigenvalues"] == int((values < -floor).sum())
    v = _v(case)
    floor = 1e-10 * values.abs().max()
    expected = ((v @ vectors) / values.abs().clamp_min(floor)) @ vectors.T
    torch.testing.assert_close(solver.ihvp(v), expected, rtol=1e-6, atol=1e-8)
    assert (solver.half_ihvp(v).square().sum(1) > 0).all()
    assert "negative eigenvalues" in solver.describe()["warnings"][0]


def test_direct_refuses_when_hessian_does_not_fit_memory():
    case = make_case("mlp")
    solver = make_solver(SolverConfig(name="direct", memory_limit_gb=1e-6))
    with pytest.raises(ConfigError, match="last_layer"):
        solver.fit(case.problem)


CAPABILITIES = {"direct": {Factored, MemoryChecked, Stateful}, "cg": set(), "lissa": {Stateful},
                "arnoldi": {Factored, Stateful}, "ekfac": {Factored, RowScorer, Stateful}}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_capabilities_are_isinstance_checks(name):
    """The command layer asks `isinstance(solver, RowScorer)` etc.: each solver has exactly the capabilities listed."""
    solver = make_solver(SolverConfig(name=name))
    has = {cap for cap in (Factored, MemoryChecked, RowScorer, Stateful) if isinstance(solver, cap)}
    assert has == CAPABILITIES[name]


def test_unknown_solver_is_a_config_error(monkeypatch):
    monkeypatch.delitem(SOLVERS, "ekfac")
    with pytest.raises(ConfigError, match="solver.name"):
        make_solver(SolverConfig(name="ekfac"))
