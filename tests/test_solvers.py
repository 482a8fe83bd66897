"""Solver contract suite (sklearn style): every solver in SOLVERS runs every check."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case

from influence_cli.config import ArnoldiConfig, CGConfig, LissaConfig, SolverConfig
from influence_cli.errors import ConfigError, DataError, NotFittedError
from influence_cli.solvers import SOLVERS, Factored, MemoryChecked, RowScorer, Stateful, make_solver

TOL = {"direct": dict(rtol=1e-8, atol=1e-10), "ekfac": dict(rtol=1e-8, atol=1e-10), "arnoldi": dict(rtol=1e-6, atol=1e-8), "cg": dict(rtol=1e-6, atol=1e-8), "lissa": dict(rtol=2e-2, atol=2e-3)}
# per-solver settings for the contract: tolerances tight enough for TOL (the forward error of an
# iterative solve is up to condition number x residual); lissa with full-data steps (deterministic)
SETTINGS = {"cg": dict(cg=CGConfig(tol=1e-10)), "lissa": dict(lissa=LissaConfig(batch_size=10**9, tol=1e-4))}
# ekfac's ihvp takes a fixed number of preconditioned CG steps (solver.ekfac.refine, default 4), whose step sizes
# depend on v: linear only up to each solve's remaining error, bounded here relative to max |ihvp| (measured
# <= 0.2% on these cases); its factored form M v is linear to round-off
NONLINEAR = {"ekfac": 5e-3}


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
    expected = 2.0 * solver.ihvp(a[None])[0] - 3.0 * solver.ihvp(b[None])[0]
    if solver.name not in NONLINEAR:
        torch.testing.assert_close(combo, expected, **TOL[solver.name])
        return
    m = solver.factored_ihvp
    torch.testing.assert_close(m((2.0 * a - 3.0 * b)[None])[0], 2.0 * m(a[None])[0] - 3.0 * m(b[None])[0],
                               **TOL[solver.name])
    assert float((combo - expected).abs().max()) <= NONLINEAR[solver.name] * float(expected.abs().max())


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


def test_arnoldi_below_full_rank_is_exact_on_its_top_space_and_bounded_off_it():
    """The contract suite's arnoldi has rank + oversample >= p (its exact path); here rank 3, block 10, p = 147:
    the top eigenpairs are exact, so ihvp is the direct solve on their span, and off it the factored form's error
    is at most (1/lambda_min - 1/lambda_4) ||(I - P) v||, as c lies in [lambda_min, lambda_4] (arnoldi.py)."""
    case = make_case("mlp", n=12, d=20, damping=3.0)
    p, rank = case.problem.params.size, 3
    h = case.exact_hessian()
    values, vectors = torch.linalg.eigh(h)  # ascending
    assert values[0] > 0, "positive definite, as the bound assumes"
    top, lam = vectors[:, -rank:].T, values[-rank:]
    assert float(values[-rank] - values[-rank - 1]) > 0.1, "the check needs a gap at the rank"
    config = ArnoldiConfig(rank=rank, oversample=7, tol=1e-10, max_iter=30)
    solver = make_solver(SolverConfig(name="arnoldi", damping=3.0, arnoldi=config)).fit(case.problem)
    info = solver.describe()
    assert info["rank"] == rank and info["converged"] and info["krylov_dim"] < p and info["complement"] == "rayleigh"
    state = solver.state()
    torch.testing.assert_close(state["values"].sort().values, lam, rtol=1e-10, atol=0)
    u = state["vectors"]
    assert float(torch.linalg.matrix_norm(top.T @ top - u.T @ u, ord=2)) < 1e-8  # the same top space
    v = _v(case, 4)
    in_top = (v @ top.T) @ top
    direct = torch.linalg.solve(h, in_top.T).T
    torch.testing.assert_close(solver.factored_ihvp(in_top), direct, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(solver.ihvp(in_top), direct, rtol=1e-8, atol=1e-10)  # refine keeps it there
    c = info["complement_constant"]
    assert float(values[0]) <= c <= float(values[-rank - 1])
    error = (solver.factored_ihvp(v) - torch.linalg.solve(h, v.T).T).norm(dim=1)
    rest = (v - (v @ top.T) @ top).norm(dim=1)
    assert (error <= (1 / values[0] - 1 / values[-rank - 1]) * rest * (1 + 1e-8)).all()
    refined = (solver.ihvp(v) - torch.linalg.solve(h, v.T).T).norm(dim=1)
    assert (refined < 0.5 * error).all()  # 2 refine steps on exact HVPs: measured 3-8x smaller


def test_lissa_with_minibatches_keeps_the_contract():
    """The contract suite's lissa takes full-data steps (deterministic); with minibatches of 10 rows (seeded from
    problem.seed, redrawn identically on every call) it is still linear in v, column by column, and close to the
    direct solve, and the seed is the only randomness."""
    case = make_case("logreg", damping=0.05)
    config = SolverConfig(name="lissa", damping=0.05, lissa=LissaConfig(batch_size=10, depth=300))
    solver = make_solver(config).fit(case.problem)
    assert solver.describe()["minibatches"] is True
    v = _v(case, 3)
    x = solver.ihvp(v)
    direct = torch.linalg.solve(case.exact_hessian(), v.T).T
    assert float((x - direct).abs().max()) < 3e-2 * float(direct.abs().max())  # stochastic: measured 1.0%, 1.5% with seed 1
    torch.testing.assert_close(solver.ihvp(v[1:2])[0], x[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solver.ihvp((2.0 * v[0] - 3.0 * v[2])[None])[0], 2.0 * x[0] - 3.0 * x[2],
                               rtol=1e-9, atol=1e-10)
    case.problem.seed = 1  # other minibatches: another answer, as close
    y = solver.ihvp(v)
    assert not torch.allclose(y, x, rtol=1e-6, atol=0)
    assert float((y - direct).abs().max()) < 3e-2 * float(direct.abs().max())


CAPABILITIES = {"direct": {Factored, MemoryChecked, Stateful}, "cg": set(), "lissa": {Stateful},
                "arnoldi": {Factored, Stateful}, "ekfac": {Factored, RowScorer, Stateful}}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_capabilities_are_isinstance_checks(name):
    """The command layer asks `isinstance(solver, RowScorer)` etc.: each solver has exactly the capabilities listed."""
    solver = make_solver(SolverConfig(name=name))
    has = {cap for cap in (Factored, MemoryChecked, RowScorer, Stateful) if isinstance(solver, cap)}
    assert has == CAPABILITIES[name]


def test_direct_names_a_hessian_that_is_not_finite():
    case = make_case("logreg")
    with torch.no_grad():
        case.problem.model.weight[1, 2] = float("nan")  # a diverged checkpoint
    with pytest.raises(DataError, match=r"non-finite entries \(324 of 18x18, in the rows of weight, bias\): the"
                                        r" checkpoint has NaN/inf weights in weight \(hint") as err:
        make_solver(SolverConfig(name="direct")).fit(case.problem)
    assert err.value.exit_code == 3
    huge = make_case("ridge")
    huge.problem.train_loader.x *= 1e160  # x x^T overflows float64; the weights are fine
    with pytest.raises(DataError, match=r"\(25 of 6x6, in the rows of weight\): the checkpoint's weights or the"
                                        " training features overflow"):
        make_solver(SolverConfig(name="direct")).fit(huge.problem)


def test_direct_turns_a_failed_factorization_into_a_data_error(monkeypatch):
    def fails(_h):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", fails)
    with pytest.raises(DataError, match=r"the 6x6 Hessian could not be factored .*failed to converge.*largest entry"):
        make_solver(SolverConfig(name="direct")).fit(make_case("ridge").problem)


def test_unknown_solver_is_a_config_error(monkeypatch):
    monkeypatch.delitem(SOLVERS, "ekfac")
    with pytest.raises(ConfigError, match="solver.name"):
        make_solver(SolverConfig(name="ekfac"))
