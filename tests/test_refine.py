"""refine.py cannot make an answer worse: per solve it returns, of the solver's own answer M v and the CG
iterates, the one of smallest residual, and keeps M v where A shows non-positive curvature."""

from __future__ import annotations

import torch
from conftest import make_case

from influence_cli.config import ArnoldiConfig, SolverConfig
from influence_cli.gradients import GradientSource
from influence_cli.solvers import make_solver
from influence_cli.solvers.pcg import pcg
from influence_cli.solvers.refine import RefineLog, refine


def _indefinite_with_a_psd_preconditioner(seed=1):
    """A with 3 negative eigenvalues, M the inverse of a perturbed PSD approximation of it (as EK-FAC's
    Gauss-Newton curvature approximates an exact Hessian that is not positive definite)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=g))
    eig = torch.cat([-torch.linspace(0.3, 0.1, 3, dtype=torch.float64), torch.linspace(0.2, 4, 27, dtype=torch.float64)])
    a = q @ torch.diag(eig) @ q.T
    noise = torch.randn(30, 30, dtype=torch.float64, generator=g) * 0.1
    m = torch.linalg.inv(q @ torch.diag(eig.clamp_min(0.05)) @ q.T + noise @ noise.T / 30)
    b = torch.randn(20, 30, dtype=torch.float64, generator=g)
    return (lambda d: d @ a), (lambda r: r @ m), b


def _residual(hvp, x, b):
    return (b - hvp(x)).norm(dim=1) / b.norm(dim=1)


def test_refine_on_an_indefinite_matrix_never_ends_worse_than_the_unrefined_answer():
    hvp, precondition, b = _indefinite_with_a_psd_preconditioner()
    before = _residual(hvp, precondition(b), b)
    old = pcg(hvp, b, 3, 1e-12, precondition)  # what refine returned before: CG's last iterate
    old.x[old.stalled] = precondition(b[old.stalled])
    assert int((_residual(hvp, old.x, b) > before * (1 + 1e-9)).sum()) >= 3, "the fixture must show the old failure"
    for steps in (1, 2, 4):
        log = RefineLog("test")
        x = refine(hvp, precondition, b, steps, log)
        after = _residual(hvp, x, b)
        assert (after <= before * (1 + 1e-9)).all(), (steps, after - before)
        torch.testing.assert_close(torch.tensor(log.after, dtype=torch.float64), after, rtol=1e-6, atol=1e-12)  # what it reports
        info = log.describe({}, steps)
        improved = int((after < before * (1 - 1e-9)).sum())
        assert info["refine_negative_curvature"] > 0 and info["refine_kept_unrefined"] == 20 - improved
        assert "kept the unrefined test answer" in info["warnings"][-1]


def test_refine_on_a_definite_matrix_returns_cg_whose_a_norm_error_never_exceeds_the_unrefined_one():
    """Positive definite A, a poor preconditioner: refine returns CG's last iterate; its A-norm error is below M v's
    at every step count, though its residual may be above (the log counts those solves)."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=g))
    a = q @ torch.diag(torch.logspace(-2, 1, 30, dtype=torch.float64)) @ q.T
    m = torch.linalg.inv(a + 0.5 * torch.randn(30, 30, dtype=torch.float64, generator=g).square())
    b = torch.randn(16, 30, dtype=torch.float64, generator=g)
    exact = torch.linalg.solve(a, b.T).T

    def energy(x):
        e = x - exact
        return ((e @ a) * e).sum(1)

    hvp, precondition = (lambda d: d @ a), (lambda r: r @ m)
    for steps in (1, 3, 6):
        log = RefineLog("plain")
        x = refine(hvp, precondition, b, steps, log)
        torch.testing.assert_close(x, pcg(hvp, b, steps + 1, 1e-12, precondition).x, rtol=0, atol=0)
        assert (energy(x) <= energy(precondition(b)) * (1 + 1e-9)).all()
        assert log.negative_curvature == 0 and log.kept_unrefined == 0
        assert log.grew == int((_residual(hvp, x, b) > _residual(hvp, precondition(b), b)).sum())


def test_arnoldi_refine_on_an_indefinite_exact_hessian_is_never_worse_than_plain_arnoldi():
    case = make_case("mlp", damping=0.0, weight_decay=1e-3, d=6, classes=4, n=60)
    source = GradientSource(case.problem)
    assert torch.linalg.eigvalsh(source.dense_hessian()).min() < 0
    v = torch.randn(12, case.problem.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3):
        solver = make_solver(SolverConfig(name="arnoldi", damping=0.0,
                                          arnoldi=ArnoldiConfig(rank=8, oversample=4, refine=steps))).fit(case.problem)
        before = _residual(source.hvp, solver.factored_ihvp(v), v)
        after = _residual(source.hvp, solver.ihvp(v), v)
        assert (after <= before * (1 + 1e-9)).all(), (after - before)
        info = solver.describe()
        assert info["refine_residual_max"] <= info["arnoldi_residual_max"] * (1 + 1e-9)
