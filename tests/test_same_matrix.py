"""Every solver inverts the same, documented matrix (README "Solvers"): A^-1 for A = H + damping I (H per
solver.hessian, weight decay included) when A is positive definite, and the saddle-free |A|^-1 (negative
eigenvalues by their absolute value) when it is not; checked against explicit inverses on small problems."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case

from influence_cli.config import ArnoldiConfig, CGConfig, LissaConfig, SolverConfig
from influence_cli.errors import DataError
from influence_cli.solvers import make_solver
from influence_cli.solvers.lanczos import abs_solve

EXACT = {"direct": {}, "cg": dict(cg=CGConfig(tol=1e-12, max_iter=400)),
         "arnoldi": dict(arnoldi=ArnoldiConfig(rank=1000))}  # rank >= p: all eigenpairs, exact


def _v(p, k=4, seed=0):
    return torch.randn(k, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _saddle_free(a, v):
    values, vectors = torch.linalg.eigh(a)
    return ((v @ vectors) / values.abs().clamp_min(1e-10 * values.abs().max())) @ vectors.T


def _indefinite():
    case = make_case("mlp", damping=0.0, weight_decay=1e-2, d=4, classes=3)  # p = 51: indefinite, no ~0 eigenvalue
    values = torch.linalg.eigvalsh(case.exact_hessian())
    assert values.min() < -1e-3 and values.abs().min() > 1e-4, "the fixture must be indefinite and invertible"
    return case


@pytest.mark.parametrize("name", sorted(EXACT))
def test_every_solver_applies_the_saddle_free_inverse_of_an_indefinite_hessian(name):
    case = _indefinite()
    v = _v(case.problem.params.size)
    expected = _saddle_free(case.exact_hessian(), v)
    got = make_solver(SolverConfig(name=name, damping=0.0, **EXACT[name])).fit(case.problem).ihvp(v)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(got, torch.linalg.solve(case.exact_hessian(), v.T).T, rtol=1e-2, atol=1e-4)


def test_cg_on_an_indefinite_hessian_says_it_used_the_saddle_free_inverse():
    case = _indefinite()
    solver = make_solver(SolverConfig(name="cg", damping=0.0, **EXACT["cg"])).fit(case.problem)
    solver.ihvp(_v(case.problem.params.size))
    info = solver.describe()
    assert info["saddle_free_solves"] == 4 and info["not_converged"] == 0
    assert any("saddle-free" in w for w in info["warnings"])


@pytest.mark.parametrize("hessian", ["exact", "gauss_newton"])
@pytest.mark.parametrize("name", ["direct", "cg", "arnoldi", "lissa"])
def test_every_solver_applies_the_plain_inverse_of_a_positive_definite_hessian(name, hessian):
    """The same MLP, damped to positive definite: A^-1 itself (lissa with full-data steps and enough depth)."""
    case = make_case("mlp", damping=0.5, weight_decay=1e-2, d=4, classes=3, hessian=hessian)
    from influence_cli.gradients import GradientSource

    a = GradientSource(case.problem).dense_hessian()
    assert torch.linalg.eigvalsh(a).min() > 0
    settings = {**EXACT, "lissa": dict(lissa=LissaConfig(batch_size=10**9, depth=5000, tol=1e-11))}[name]
    v = _v(case.problem.params.size)
    got = make_solver(SolverConfig(name=name, damping=0.5, hessian=hessian, **settings)).fit(case.problem).ihvp(v)
    torch.testing.assert_close(got, torch.linalg.solve(a, v.T).T, rtol=1e-6, atol=1e-8)


def test_lissa_does_not_return_a_silent_answer_on_an_indefinite_hessian():
    """LiSSA's Neumann series has no saddle-free form: on an indefinite A it either stops with a DataError or
    warns through its measured residual (README: use cg or direct there)."""
    case = _indefinite()
    solver = make_solver(SolverConfig(name="lissa", damping=0.0, lissa=LissaConfig(batch_size=10**9, depth=3000)))
    try:
        solver.fit(case.problem).ihvp(_v(case.problem.params.size))
    except DataError:
        return
    assert solver.describe().get("warnings"), solver.describe()


def test_abs_solve_is_the_saddle_free_inverse_and_cg_where_definite():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g))
    eig = torch.cat([-torch.linspace(0.3, 0.1, 5, dtype=torch.float64), torch.linspace(0.2, 4.0, 35, dtype=torch.float64)])
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(4, 40, dtype=torch.float64, generator=g)
    b[2] = 0
    res = abs_solve(lambda d: d @ a, b, 200, 1e-12)
    torch.testing.assert_close(res.x, _saddle_free(a, b), rtol=1e-9, atol=1e-12)
    assert res.converged.all() and res.negative.tolist() == [True, True, False, True] and res.steps[2] == 0
    definite = q @ torch.diag(eig.abs()) @ q.T
    res = abs_solve(lambda d: d @ definite, b, 200, 1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(definite, b.T).T, rtol=1e-9, atol=1e-12)
    assert not res.negative.any() and res.passes <= 2 * int(res.steps.max())
