"""CG and LiSSA against exact dense float64 solves on the tiny problems of conftest.py."""

from __future__ import annotations

import pytest
import torch
from conftest import ListLoader, make_case

from influence_cli.config import CGConfig, LissaConfig, SolverConfig
from influence_cli.errors import DataError
from influence_cli.gradients import GradientSource
from influence_cli.solvers import lissa as lissa_module
from influence_cli.solvers import make_solver
from influence_cli.solvers.cg import CGSolver
from influence_cli.solvers.lissa import LissaSolver, _Minibatches

DAMPING = {"ridge": 0.05, "logreg": 0.05, "mlp": 1.0}  # mlp: enough for a positive-definite exact Hessian


def _v(case, k=3, seed=0):
    return torch.randn(k, case.problem.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _solver(name, damping, **settings):
    block = CGConfig(**settings) if name == "cg" else LissaConfig(**settings)
    return make_solver(SolverConfig(name=name, damping=damping, **{name: block}))


def _rel(x, y):
    return float(((x - y).norm(dim=1) / y.norm(dim=1)).max())


# ---- minibatch HVP (the one method LiSSA adds to GradientSource) ------------------------------
def test_minibatch_hvp_is_the_hessian_of_the_batch_mean_loss():
    case = make_case("logreg", damping=0.05)
    rows = torch.tensor([3, 7, 8, 20, 31])
    x, y = case.x[rows], case.y[rows]
    pr = case.problem

    def batch_objective(flat):
        named = {k: t.detach() for k, t in pr.model.named_parameters()} | pr.params.unflatten(flat)
        out = torch.func.functional_call(pr.model, named, (x,))
        return pr.objective.per_example_loss(out, y).mean() + pr.objective.regularizer(flat)

    exact = torch.autograd.functional.hessian(batch_objective, case.flat_params()) + 0.05 * torch.eye(pr.params.size,
                                                                                                        dtype=torch.float64)
    v = _v(case, 4)
    torch.testing.assert_close(GradientSource(pr).minibatch_hvp(v, x, y), v @ exact, rtol=1e-9, atol=1e-11)
    # on all rows it is the full-data HVP
    torch.testing.assert_close(GradientSource(pr).minibatch_hvp(v, case.x, case.y), GradientSource(pr).hvp(v),
                               rtol=1e-10, atol=1e-12)


# ---- CG ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ridge", "logreg", "mlp"])
def test_cg_matches_dense_solve(kind):
    case = make_case(kind, damping=DAMPING[kind])
    v = _v(case)
    expected = torch.linalg.solve(case.exact_hessian(), v.T).T
    solver = _solver("cg", DAMPING[kind], tol=1e-10).fit(case.problem)
    torch.testing.assert_close(solver.ihvp(v), expected, rtol=1e-6, atol=1e-9)
    info = solver.describe()
    assert info["solves"] == 3 and info["not_converged"] == 0 and "warnings" not in info
    assert info["residual_max"] <= 1e-9


def test_cg_default_tol_bounds_the_true_residual_and_reports_it():
    case = make_case("logreg", damping=0.05)
    hess = case.exact_hessian()
    v = _v(case, 4)
    solver = make_solver(SolverConfig(name="cg", damping=0.05)).fit(case.problem)
    x = solver.ihvp(v)
    residual = (v - x @ hess).norm(dim=1) / v.norm(dim=1)
    assert float(residual.max()) <= 1.01e-6
    info = solver.describe()
    assert info["residual_max"] == pytest.approx(float(residual.max()), rel=1e-3)
    assert 1 <= info["iterations_median"] <= info["iterations_max"] <= case.problem.params.size + 1
    values = torch.linalg.eigvalsh(hess)  # Ritz values from CG's own coefficients
    assert info["eig_max_estimate"] == pytest.approx(float(values[-1]), rel=1e-3)
    assert info["eig_min_estimate"] == pytest.approx(float(values[0]), rel=1e-2)


def test_cg_runs_columns_in_lockstep_and_freezes_converged_ones():
    case = make_case("ridge", damping=0.05)
    hess = case.exact_hessian()
    eigvec = torch.linalg.eigh(hess)[1][:, 2]
    alone = _solver("cg", 0.05, tol=1e-10).fit(case.problem)
    alone.ihvp(_v(case, 1))
    iters = alone.describe()["iterations_max"]
    solver = _solver("cg", 0.05, tol=1e-10).fit(case.problem)
    x = solver.ihvp(torch.stack([eigvec, _v(case, 1)[0]]))
    info = solver.describe()
    # an eigenvector converges in one step and leaves the pass; the random column needs `iters`;
    # the two share one data pass per iteration, plus one pass for the true residual
    assert solver._iterations == [1, iters]
    assert info["hvp_passes"] == iters + 1
    torch.testing.assert_close(x[0], torch.linalg.solve(hess, eigvec), rtol=1e-9, atol=1e-12)


def test_cg_warns_when_it_does_not_converge():
    case = make_case("logreg", damping=0.05)
    solver = _solver("cg", 0.05, max_iter=2, tol=1e-8).fit(case.problem)
    solver.ihvp(_v(case, 3))
    info = solver.describe()
    assert info["iterations_max"] == 2 and info["not_converged"] == 3
    assert info["residual_max"] > 1e-8
    assert len(info["warnings"]) == 1 and "solver.cg.max_iter" in info["warnings"][0]
    assert "3 of 3 solves" in info["warnings"][0]


def test_cg_zero_right_hand_side_is_zero_without_work():
    case = make_case("ridge", damping=0.05)
    solver = _solver("cg", 0.05).fit(case.problem)
    v = torch.zeros(2, case.problem.params.size, dtype=torch.float64)
    assert torch.equal(solver.ihvp(v), v)
    assert solver.describe()["iterations_max"] == 0


def test_cg_warns_on_non_positive_curvature():
    case = make_case("mlp", damping=0.0, weight_decay=1e-2, d=4, classes=3)
    assert torch.linalg.eigvalsh(case.exact_hessian()).min() < 0
    solver = _solver("cg", 0.0, tol=1e-10).fit(case.problem)
    solver.ihvp(_v(case, 8))
    assert any("not positive definite" in w for w in solver.describe()["warnings"])


def test_cg_estimate_counts_n_solves_for_self_influence():
    config = SolverConfig(name="cg")
    small, large = CGSolver.estimate(config, 1000, 650), CGSolver.estimate(config, 2000, 650)
    assert large.fit_flops == pytest.approx(4 * small.fit_flops)  # n solves x n rows per pass
    assert "n CG solves" in small.note


# ---- LiSSA ---------------------------------------------------------------------------------------
def test_lissa_full_batch_recursion_is_exactly_the_neumann_recursion():
    """h_0 = v, h_j = v + h_{j-1} - A h_{j-1} / scale, result h_depth / scale, with the dense A."""
    case = make_case("logreg", damping=0.05)
    hess, v = case.exact_hessian(), _v(case, 2)
    solver = _solver("lissa", 0.05, batch_size=10**6, depth=20, scale=0.4, tol=0.0).fit(case.problem)
    h = v.clone()
    for _ in range(20):
        h = v + h - h @ hess / 0.4
    torch.testing.assert_close(solver.ihvp(v), h / 0.4, rtol=1e-10, atol=1e-12)
    info = solver.describe()
    assert info["minibatches"] is False and info["scale_from"] == "config" and info["steps_max"] == 20


@pytest.mark.parametrize("kind", ["ridge", "logreg", "mlp"])
def test_lissa_full_batch_converges_to_the_dense_solve(kind):
    case = make_case(kind, damping=DAMPING[kind])
    v = _v(case)
    expected = torch.linalg.solve(case.exact_hessian(), v.T).T
    solver = _solver("lissa", DAMPING[kind], batch_size=case.problem.n, tol=1e-6).fit(case.problem)
    assert _rel(solver.ihvp(v), expected) < 1e-4  # forward error <= condition number x residual
    assert solver.describe()["residual_max"] < 1e-6


def test_lissa_scale_auto_is_just_above_the_divergence_threshold():
    case = make_case("ridge", damping=0.05)
    lam = float(torch.linalg.eigvalsh(case.exact_hessian())[-1])
    solver = _solver("lissa", 0.05, batch_size=case.problem.n, tol=1e-6).fit(case.problem)
    info = solver.describe()
    assert info["lambda_max"] == pytest.approx(lam, rel=2e-3)  # power iteration, from below
    assert lam / 2 < info["scale"] <= lissa_module.SAFETY * lam / 2 * 1.001
    solver.ihvp(_v(case, 1))  # converges: no DataError
    assert solver.describe()["residual_max"] < 1e-6


def test_lissa_diverges_loudly_with_a_too_small_scale():
    case = make_case("logreg", damping=0.05)
    lam = float(torch.linalg.eigvalsh(case.exact_hessian())[-1])
    solver = _solver("lissa", 0.05, batch_size=case.problem.n, scale=0.3 * lam).fit(case.problem)
    with pytest.raises(DataError, match="diverged") as err:
        solver.ihvp(_v(case))
    assert err.value.exit_code == 3
    assert "solver.lissa.scale" in str(err.value.hint)


def test_lissa_warns_when_the_depth_is_too_small():
    case = make_case("ridge", damping=0.05)
    solver = _solver("lissa", 0.05, batch_size=case.problem.n, depth=3, tol=1e-6).fit(case.problem)
    solver.ihvp(_v(case, 2))
    info = solver.describe()
    assert info["steps_max"] == 3 and info["not_converged"] == 2 and info["residual_max"] > 1e-6
    assert "solver.lissa.depth" in info["warnings"][0]


def test_lissa_minibatch_run_is_seeded_linear_and_close_to_the_dense_solve():
    case = make_case("ridge", n=60, damping=0.05)
    v = _v(case)
    expected = torch.linalg.solve(case.exact_hessian(), v.T).T
    solver = _solver("lissa", 0.05, batch_size=20, depth=200).fit(case.problem)
    x = solver.ihvp(v)
    info = solver.describe()
    assert info["minibatches"] is True and info["lambda_max_minibatch"] > 0
    assert _rel(x, expected) < 0.1  # stochastic: a looser tolerance than the full-data runs
    # the same minibatch sequence on every call: linear in v, and independent of the batching of v
    torch.testing.assert_close(solver.ihvp(v[1:2])[0], x[1], rtol=1e-10, atol=1e-12)
    combo = solver.ihvp((2 * v[0] - 3 * v[2])[None])[0]
    torch.testing.assert_close(combo, 2 * x[0] - 3 * x[2], rtol=1e-9, atol=1e-10)
    other = make_case("ridge", n=60, damping=0.05, seed=0)
    other.problem.seed = 1
    y = _solver("lissa", 0.05, batch_size=20, depth=200).fit(other.problem).ihvp(v[:1])
    assert not torch.allclose(x[:1], y) and _rel(y, expected[:1]) < 0.1


def test_lissa_repeats_average_runs_with_consecutive_seeds():
    case = make_case("ridge", n=60, damping=0.05)
    v = _v(case, 1)
    one = _solver("lissa", 0.05, batch_size=20, depth=60).fit(case.problem)
    two = _solver("lissa", 0.05, batch_size=20, depth=60, repeats=2).fit(case.problem)
    mean = two.ihvp(v)
    first = one.ihvp(v)
    case.problem.seed = 1  # run r draws its minibatches with seed problem.seed + r
    second = one.ihvp(v)
    torch.testing.assert_close(mean, (first + second) / 2, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(first, second)


def test_minibatches_are_uniform_and_stream_through_windows(monkeypatch):
    x = torch.arange(50, dtype=torch.float64)[:, None]
    loader = ListLoader(x, torch.arange(50), batch_size=7)
    for window in (2**30, 100):  # all rows in memory / windows of ~7 loader batches of 7 rows
        monkeypatch.setattr(lissa_module, "WINDOW_BYTES", window)
        stream = _Minibatches(loader, 5).stream(torch.Generator().manual_seed(0))
        counts = torch.zeros(50)
        for _ in range(400):
            xb, yb = next(stream)
            assert xb.shape == (5, 1) and torch.equal(xb[:, 0].long(), yb)
            assert len(set(yb.tolist())) == 5  # without replacement within a minibatch
            counts[yb] += 1
        assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_lissa_estimate_counts_n_solves_and_the_power_iteration():
    config = SolverConfig(name="lissa", lissa=LissaConfig(batch_size=100, depth=500))
    cost = LissaSolver.estimate(config, 10_000, 650)
    assert cost.fit_flops >= 10_000 * 500 * 100 * 650  # n solves x depth x batch rows x p
    assert "n solves" in cost.note


def test_pcg_is_the_one_cg_loop_and_leaves_its_right_hand_side_alone():
    """pcg.py with M = I is plain CG (the cg solver); with M = A^-1 it is done in one step (refine's exact case)."""
    from influence_cli.solvers.pcg import lanczos_extremes, pcg

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=g))
    eig = torch.linspace(0.5, 4.0, 8, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(3, 8, dtype=torch.float64, generator=g)
    b[1] = 0
    kept = b.clone()
    plain = pcg(lambda d: d @ a, b, 50, 1e-12, track=0)
    torch.testing.assert_close(b, kept, rtol=0, atol=0)  # the identity preconditioner must not alias b
    torch.testing.assert_close(plain.x, torch.linalg.solve(a, b.T).T, rtol=1e-9, atol=1e-12)
    assert plain.steps.tolist()[1] == 0 and plain.steps.max() <= 8 and plain.residual.max() <= 1e-12
    low, high = lanczos_extremes(plain.alphas, plain.betas)
    assert abs(low - 0.5) < 1e-8 and abs(high - 4.0) < 1e-8
    exact = pcg(lambda d: d @ a, b, 5, 1e-12, precondition=lambda r: torch.linalg.solve(a, r.T).T)
    assert exact.passes == 1 and exact.steps.tolist() == [1, 0, 1]
    torch.testing.assert_close(exact.x, plain.x, rtol=1e-9, atol=1e-12)
    indefinite = pcg(lambda d: -(d @ a), b, 5, 1e-12)
    assert indefinite.stalled.tolist() == [True, False, True] and indefinite.negative_curvature == 2
    assert not indefinite.x.any()
