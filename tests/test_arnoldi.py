"""Arnoldi solver: the Krylov core on explicit matrices, the complement formula, and the solver
against exact answers (dense float64 Hessians and per-row gradients from tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_case

from influence_cli.config import ArnoldiConfig, SolverConfig
from influence_cli.errors import ConfigError, NotFittedError
from influence_cli.solvers import make_solver
from influence_cli.solvers.arnoldi import block_krylov, complement_constant

D = torch.float64


def _sym(values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = V^T diag(values) V with a random orthogonal V (rows = eigenvectors)."""
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), dtype=D, generator=torch.Generator().manual_seed(seed)))
    rows = q.T
    return rows.T @ torch.diag(values) @ rows, rows


def _start(b: int, p: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, p, dtype=D, generator=torch.Generator().manual_seed(seed))


def _same_subspace(u: torch.Tensor, v: torch.Tensor) -> float:
    """Largest deviation of |u_i . v_i| from 1 (eigenvectors match up to sign)."""
    return float(((u * v).sum(1).abs() - 1).abs().max())


# ---- the core -----------------------------------------------------------------------------------
def test_core_finds_top_eigenpairs_of_explicit_matrix():
    p, rank = 80, 6
    values = torch.cat([torch.tensor([50.0, 30.0, 20.0, 12.0, 8.0, 5.0], dtype=D), torch.linspace(2.0, 0.01, p - 6, dtype=D)])
    a, vecs = _sym(values)
    calls = []
    result = block_krylov(lambda v: (calls.append(len(v)), v @ a)[1], _start(10, p), rank, max_passes=20, tol=1e-10)
    assert result.converged and result.hvps == sum(calls) and result.passes == len(calls)
    torch.testing.assert_close(result.values, values[:rank], rtol=1e-10, atol=1e-12)
    assert _same_subspace(result.vectors, vecs[:rank]) < 1e-9
    torch.testing.assert_close(result.vectors @ result.vectors.T, torch.eye(rank, dtype=D), atol=1e-12, rtol=0)
    true_res = (result.vectors @ a - result.values[:, None] * result.vectors).norm(dim=1)
    torch.testing.assert_close(result.residuals, true_res, atol=1e-12, rtol=1e-6)  # the free residuals are exact
    assert float(result.residuals.max()) <= 1e-10 * 50.0


def test_core_orders_by_magnitude_and_keeps_negative_values():
    p = 30
    values = torch.cat([torch.tensor([9.0, -7.0, 4.0], dtype=D), torch.linspace(1.0, -1.0, p - 3, dtype=D)])
    a, vecs = _sym(values, seed=3)
    result = block_krylov(lambda v: v @ a, _start(6, p), 3, max_passes=30, tol=1e-11)
    torch.testing.assert_close(result.values, torch.tensor([9.0, -7.0, 4.0], dtype=D), rtol=1e-9, atol=1e-10)
    assert _same_subspace(result.vectors, vecs[:3]) < 1e-8


def test_core_is_exact_once_the_space_fills_rp():
    p = 17
    a, _ = _sym(torch.logspace(1, -3, p, dtype=D), seed=5)
    result = block_krylov(lambda v: v @ a, _start(7, p), p, max_passes=10, tol=0.0)
    assert result.converged and result.dim == p and result.passes == 3  # 7 + 7 + 3 directions
    torch.testing.assert_close(result.vectors.T @ torch.diag(result.values) @ result.vectors, a, rtol=1e-10, atol=1e-12)


def test_core_thick_restart_keeps_converging_within_max_dim():
    p, rank, b = 120, 4, 8
    values = torch.cat([torch.tensor([10.0, 9.0, 8.5, 8.0], dtype=D), torch.linspace(7.0, 0.1, p - 4, dtype=D)])
    a, vecs = _sym(values, seed=7)
    result = block_krylov(lambda v: v @ a, _start(b, p), rank, max_passes=50, tol=1e-8, max_dim=3 * b)
    assert result.restarts > 0 and result.dim <= 3 * b and result.converged
    torch.testing.assert_close(result.values, values[:rank], rtol=1e-9, atol=1e-10)
    assert _same_subspace(result.vectors, vecs[:rank]) < 1e-6


def test_complement_constant_is_the_pooled_rayleigh_quotient_of_the_deflated_probes():
    p, r = 25, 4
    values = torch.linspace(6.0, 0.5, p, dtype=D)
    a, vecs = _sym(values, seed=11)
    probes = _start(9, p, seed=12)
    u = vecs[:r]
    rest = probes - (probes @ u.T) @ u
    expected = float((rest @ a * rest).sum() / rest.square().sum())
    got = complement_constant(values[:r], u, probes, probes @ a)
    assert got == pytest.approx(expected, rel=1e-12)
    assert float(values[-1]) <= got <= float(values[r])  # between lambda_min and lambda_{r+1}
    assert complement_constant(values[:r], u, u[:2] * 3.0, (u[:2] * 3.0) @ a) is None  # nothing outside span(U)


# ---- the solver -------------------------------------------------------------------------------
def _solver(rank: int, damping: float = 1.0, **kw) -> object:
    return make_solver(SolverConfig(name="arnoldi", damping=damping, arnoldi=ArnoldiConfig(rank=rank, **kw)))


def _row_grads(case) -> torch.Tensor:
    """Exact per-row gradients (n, p) of the task loss, by autograd one row at a time."""
    pr, flat = case.problem, case.flat_params()
    named = {k: v.detach() for k, v in pr.model.named_parameters()}

    def loss(theta, x, y):
        out = torch.func.functional_call(pr.model, {**named, **pr.params.unflatten(theta)}, (x[None],))
        return pr.objective.per_example_loss(out, y[None])[0]

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(flat, case.x, case.y)


def _v(p: int, k: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, p, dtype=D, generator=torch.Generator().manual_seed(seed))


def test_rank_at_least_p_is_exact_and_reports_it():
    case = make_case("logreg", damping=0.05)
    p = case.problem.params.size
    solver = _solver(p, damping=0.05, oversample=0).fit(case.problem)
    v = _v(p)
    torch.testing.assert_close(solver.ihvp(v), torch.linalg.solve(case.exact_hessian(), v.T).T, rtol=1e-9, atol=1e-11)
    info = solver.describe()
    assert info["rank"] == p and info["complement"] == "exact" and info["passes"] == 1 and info["hvps"] == p
    json.dumps(info)


@pytest.mark.parametrize("complement", ["rayleigh", "ritz", "none"])
def test_rank_below_p_is_exactly_the_documented_approximation(complement):
    case = make_case("mlp", damping=1.0)  # p = 57, n = 40; positive definite with this damping
    p, rank = case.problem.params.size, 5
    h = case.exact_hessian()
    values, vectors = torch.linalg.eigh(h)
    order = values.abs().argsort(descending=True)
    assert float(values.abs()[order[rank - 1]] - values.abs()[order[rank]]) > 1e-3, "needs a gap at the rank"
    u, lam = vectors[:, order[:rank]].T, values[order[:rank]].abs()
    # oversample 40: the block (45) holds every row's gradient as a probe, and 2 passes fill R^57
    solver = _solver(rank, oversample=40, tol=1e-12, complement=complement).fit(case.problem)
    info = solver.describe()
    assert info["rank"] == rank and info["probes"] == 40 and info["converged"]
    g = _row_grads(case)
    rest = g - (g @ u.T) @ u
    c = {"rayleigh": float((rest @ h * rest).sum() / rest.square().sum()), "ritz": float(lam.min()), "none": None}[complement]
    assert info["complement_constant"] == (None if c is None else pytest.approx(c, rel=1e-8))
    v = _v(p)
    a = v @ u.T
    expected = (a / lam) @ u + (0.0 if c is None else (v - a @ u) / c)
    torch.testing.assert_close(solver.factored_ihvp(v), expected, rtol=1e-8, atol=1e-10)
    # half_ihvp is the symmetric square root: A^T A v = A A v = factored_ihvp(v), ||A v||^2 = v . factored_ihvp(v)
    torch.testing.assert_close(solver.half_ihvp(solver.half_ihvp(v)), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(solver.half_ihvp(v).square().sum(1), (v * expected).sum(1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("complement", ["rayleigh", "none"])
def test_refine_converges_from_the_low_rank_answer_to_the_exact_solve(complement):
    case = make_case("mlp", damping=1.0)  # p = 57, positive definite: rank 5 leaves most of it to the complement
    v = _v(case.problem.params.size)
    exact = torch.linalg.solve(case.exact_hessian(), v.T).T
    errors = []
    for steps in (0, 1, 2, 4, 8, 40):
        solver = _solver(5, damping=1.0, oversample=5, tol=1e-10, complement=complement, refine=steps)
        solver.fit(case.problem)
        got = solver.ihvp(v)
        errors.append(float((got - exact).norm() / exact.norm()))
        if steps == 0:
            torch.testing.assert_close(got, solver.factored_ihvp(v), rtol=0, atol=0)
            assert "refine_solves" not in solver.describe()
        else:
            info = solver.describe()
            assert info["refine"] == steps and info["refine_solves"] == len(v)
            assert info["refine_hvp_passes"] <= steps + 1 and info["arnoldi_residual_max"] > info["refine_residual_max"]
    assert all(b < a for a, b in zip(errors[:3], errors[1:4], strict=True)), errors  # each step helps at first
    assert errors[0] > 1e-2 and errors[-1] < 1e-8, errors  # PCG from the low-rank answer reaches the exact solve


def test_complement_beats_truncation_on_train_to_test_influence():
    """The point of the complement: mean-test-loss influence ranks agree far better with exact."""
    case = make_case("logreg", n=200, d=12, classes=4, damping=1e-3)  # p = 52
    h = case.exact_hessian()
    g = _row_grads(case)
    target = g[:20].mean(0)  # stand-in for the mean test gradient
    exact = torch.linalg.solve(h, target) @ g.T

    def spearman(s: torch.Tensor) -> float:
        ra, rb = s.argsort().argsort().double(), exact.argsort().argsort().double()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    rho = {}
    for complement in ("rayleigh", "none"):
        solver = _solver(8, damping=1e-3, oversample=8, complement=complement, max_iter=20, tol=1e-8).fit(case.problem)
        rho[complement] = spearman(solver.factored_ihvp(target[None])[0] @ g.T)
    assert rho["rayleigh"] > 0.9 and rho["rayleigh"] > rho["none"] + 0.1, rho


def test_unfitted_use_and_bad_settings_are_errors():
    with pytest.raises(NotFittedError):
        _solver(3).half_ihvp(torch.zeros(1, 5, dtype=D))
    with pytest.raises(ConfigError, match="oversample"):
        ArnoldiConfig(oversample=-1)
    with pytest.raises(ConfigError, match="rank"):
        ArnoldiConfig(rank=0)
    case = make_case("mlp")
    solver = make_solver(SolverConfig(name="arnoldi", memory_limit_gb=1e-7, arnoldi=ArnoldiConfig(rank=5, oversample=5)))
    with pytest.raises(ConfigError, match="solver.arnoldi.rank"):
        solver.fit(case.problem)


def test_not_converged_is_a_warning_with_the_fix_and_progress_is_reported():
    case = make_case("mlp", damping=1.0)
    seen = []
    solver = _solver(10, oversample=2, max_iter=1, tol=1e-14).fit(case.problem, progress=lambda d, t: seen.append((d, t)))
    info = solver.describe()
    assert not info["converged"] and info["passes"] == 1 and info["hvps"] == 12
    assert "solver.arnoldi.max_iter" in info["warnings"][0]
    assert seen == [(1, 1)]
    assert len(info["residuals"]) == 10 and info["residual_max"] > 0
