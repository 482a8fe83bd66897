"""EK-FAC against exact answers: the Hessian itself where K-FAC is exact (one Linear layer, MSE), the
Gauss-Newton diagonal in the Kronecker eigenbasis everywhere else (the definition of the correction),
hand-computed Kronecker factors, agreement of the gradient-free self-influence path with half_ihvp, and the
refinement of ihvp (solver.ekfac.refine: preconditioned CG on exact HVPs) against the exact inverse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ListLoader, make_case
from torch import nn

from influence_cli.config import EkfacConfig, SolverConfig, load_config
from influence_cli.errors import ConfigError, NotFittedError
from influence_cli.gradients import GradientSource
from influence_cli.objective import Objective, ParamSpace, Problem
from influence_cli.solvers import make_solver

F64 = dict(rtol=1e-8, atol=1e-10)
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def _solver(damping: float = 0.05, **ekfac):
    return make_solver(SolverConfig(name="ekfac", damping=damping, ekfac=EkfacConfig(**ekfac)))


def _problem(kind: str, n: int = 24, params="all", hessian: str = "gauss_newton", damping: float = 0.05) -> Problem:
    """Small float64 models exercising conv padding/stride/no-bias, sequence-shaped Linear inputs, multi-output MSE."""
    g = torch.Generator().manual_seed(3)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                              nn.Conv2d(3, 2, 2, stride=2, bias=False), nn.Flatten(), nn.Linear(8, 3))
        x, task = torch.randn(n, 2, 5, 5, generator=g), "classification"
    elif kind == "seq":  # a Linear applied at 5 positions: its per-example gradient is a sum of outer products
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))
        x, task = torch.randn(n, 5, 4, generator=g), "classification"
    elif kind == "multi":  # one Linear layer, 3 regression outputs
        model, x, task = nn.Linear(5, 3), torch.randn(n, 5, generator=g), "regression"
    elif kind == "binary_mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 1))
        x, task = torch.randn(n, 4, generator=g), "binary"
    else:
        raise ValueError(kind)
    model = model.double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    x = x.double()
    y = {"classification": torch.randint(0, 3, (n,), generator=g), "binary": torch.randint(0, 2, (n,), generator=g),
         "regression": torch.randn(n, 3, generator=g, dtype=torch.float64)}[task]
    return Problem(model, Objective(task, 1e-2), ParamSpace.select(model, params), ListLoader(x, y, 7), n, damping,
                   hessian=hessian)


def _v(problem: Problem, k: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, problem.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _grads(problem: Problem) -> torch.Tensor:
    return torch.cat([b.grads for b in GradientSource(problem).per_example(problem.train_loader)])


def _layer_index(problem: Problem, layer) -> torch.Tensor:
    """Flat parameter indices in the layer's (out, in') layout, row-major."""
    ids = problem.params.unflatten(torch.arange(problem.params.size, dtype=torch.float64)[None])
    return layer.gather(ids, 1)[0].reshape(-1).long()


@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("variant", ["ridge", "multi", "weight_only", "bias_only"])
def test_one_linear_layer_with_mse_is_exact(variant, refine):
    if variant == "ridge":
        problem = make_case("ridge", damping=1e-3).problem
    else:
        params = {"multi": "all", "weight_only": ("weight",), "bias_only": ("bias",)}[variant]
        problem = _problem("multi", params=params, hessian="exact", damping=1e-3)
    hess = GradientSource(problem).dense_hessian()
    solver = _solver(damping=1e-3, refine=refine).fit(problem)
    v = _v(problem)
    torch.testing.assert_close(solver.ihvp(v), torch.linalg.solve(hess, v.T).T, **F64)  # PCG, exact preconditioner
    grads = _grads(problem)
    exact_si = (grads * torch.linalg.solve(hess, grads.T).T).sum(1)
    torch.testing.assert_close(solver.self_influence_fast(problem.train_loader, problem.n), exact_si, **F64)
    torch.testing.assert_close(solver.half_ihvp(grads).square().sum(1), exact_si, **F64)


@pytest.mark.parametrize("kind", ["mlp", "conv", "seq", "binary_mlp"])
def test_corrected_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_basis(kind):
    """EK-FAC's defining property: diag(Q^T H_GN Q) per layer, Q = U_S x U_A, with the exact GN output factor."""
    problem = make_case("mlp", hessian="gauss_newton").problem if kind == "mlp" else _problem(kind)
    hess = GradientSource(problem).dense_hessian()  # GN + (weight_decay + damping) I
    solver = _solver(damping=problem.damping).fit(problem)
    assert solver.describe()["output_factor"] == "exact"
    for layer in solver._layers:
        idx = _layer_index(problem, layer)
        q = torch.kron(layer.u_s, layer.u_a)
        torch.testing.assert_close(q.T @ q, torch.eye(len(idx), dtype=torch.float64), **F64)
        expected = torch.diagonal(q.T @ hess[idx][:, idx] @ q).reshape(layer.diag.shape)
        torch.testing.assert_close(layer.diag, expected, **F64)


def test_kfac_factors_match_hand_computed_activations_and_gauss_newton_output_factor():
    case = make_case("mlp", hessian="gauss_newton")
    problem, model = case.problem, case.problem.model
    solver = _solver(damping=problem.damping, correct_eigenvalues=False).fit(problem)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    h = torch.tanh(case.x @ w1.T + b1)
    prob = (h @ w2.T + b2).softmax(1)
    lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # output Hessian of cross-entropy
    ones = torch.ones(len(case.x), 1, dtype=torch.float64)
    a1, a2 = torch.cat([case.x, ones], 1), torch.cat([h, ones], 1)
    jac = (1 - h.square())[:, :, None] * w2.T[None]  # d(output)/d(layer-1 output), transposed: (n, 6, 3)
    s1 = (jac @ lam @ jac.transpose(1, 2)).mean(0)
    factors = [(s1, a1.T @ a1 / len(a1)), (lam.mean(0), a2.T @ a2 / len(a2))]
    shift = problem.objective.weight_decay + problem.damping
    for layer, (s, a) in zip(solver._layers, factors, strict=True):
        q = torch.kron(layer.u_s, layer.u_a)
        rebuilt = q @ torch.diag(layer.diag.reshape(-1) - shift) @ q.T
        torch.testing.assert_close(rebuilt, torch.kron(s, a), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "conv", "seq", "binary_mlp"])
def test_gradient_free_self_influence_equals_half_ihvp_and_ihvp(kind):
    problem = make_case("mlp").problem if kind == "mlp" else _problem(kind)
    solver = _solver().fit(problem)
    grads = _grads(problem)
    via_half = solver.half_ihvp(grads).square().sum(1)
    torch.testing.assert_close(via_half, (grads * solver.factored_ihvp(grads)).sum(1), **F64)
    fast = solver.self_influence_fast(problem.train_loader, problem.n)
    torch.testing.assert_close(fast, via_half, **F64)
    x, y = problem.train_loader.x, problem.train_loader.y  # batch size does not matter
    torch.testing.assert_close(solver.self_influence_fast(ListLoader(x, y, 5), problem.n), fast, **F64)
    blocks = list(solver.self_influence_blocks(problem.train_loader))
    torch.testing.assert_close(torch.cat([b.losses for b in blocks]),
                               problem.objective.per_example_loss(problem.model(x), y), **F64)


def test_fit_is_invariant_to_batch_size():
    case = make_case("mlp")
    ref = _solver().fit(case.problem).ihvp(_v(case.problem))
    case.problem.train_loader = ListLoader(case.x, case.y, 5)
    torch.testing.assert_close(_solver().fit(case.problem).ihvp(_v(case.problem)), ref, **F64)


def test_sampled_output_factor_is_seeded_and_approaches_the_exact_one():
    problem = make_case("logreg", n=60).problem
    exact = _solver().fit(problem)
    one = _solver(output_factor="sample", samples=1).fit(problem)
    assert one.describe()["output_factor"] == "sample"
    torch.testing.assert_close(_solver(output_factor="sample").fit(problem).ihvp(_v(problem)),
                               one.ihvp(_v(problem)), rtol=0, atol=0)
    many = _solver(output_factor="sample", samples=2000).fit(problem)
    for lay_exact, lay_many in zip(exact._layers, many._layers, strict=True):
        cov_exact = lay_exact.u_s @ torch.diag(lay_exact.s_val) @ lay_exact.u_s.T
        cov_many = lay_many.u_s @ torch.diag(lay_many.s_val) @ lay_many.u_s.T
        assert (cov_many - cov_exact).norm() < 0.06 * cov_exact.norm()
    v = _v(problem)
    err = (many.ihvp(v) - exact.ihvp(v)).norm() / exact.ihvp(v).norm()
    err_one = (one.ihvp(v) - exact.ihvp(v)).norm() / exact.ihvp(v).norm()
    assert err < 0.05 and err < err_one


def test_unsupported_layer_is_a_config_error_that_names_it_and_params_excludes_it():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)

    def problem(params):
        return Problem(model, Objective("classification", 1e-2), ParamSpace.select(model, params),
                       ListLoader(x, y, 8), 20, 0.05)

    with pytest.raises(ConfigError, match=r"1\.weight \(BatchNorm1d\).*") as err:
        _solver().fit(problem("all"))
    assert "params:" in err.value.hint
    before = {k: v.clone() for k, v in model.state_dict().items()}
    solver = _solver().fit(problem(("0", "3")))
    assert [entry["module"] for entry in solver.describe()["layers"]] == ["0", "3"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_shared_layer_raises_and_hooks_are_removed_after_an_error():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice().double().eval().requires_grad_(False)
    x = torch.randn(10, 3, dtype=torch.float64)
    pr = Problem(model, Objective("classification", 0.0), ParamSpace.select(model, "all"),
                 ListLoader(x, torch.zeros(10, dtype=torch.long), 4), 10, 0.1)
    with pytest.raises(ConfigError, match="lin"):
        _solver().fit(pr)
    assert not model.lin._forward_hooks


def test_unfitted_describe_and_estimate():
    solver = _solver()
    with pytest.raises(NotFittedError):
        solver.half_ihvp(torch.zeros(1, 3))
    with pytest.raises(NotFittedError):
        next(iter(solver.self_influence_blocks([])))
    cost = type(solver).estimate(SolverConfig(name="ekfac"), 50_000, 10**6)
    assert 0 < cost.memory_bytes < 2**30 and cost.fit_flops > 0
    info = _solver().fit(make_case("mlp").problem).describe()
    assert info["correct_eigenvalues"] and info["eig_min"] > 0 and len(info["layers"]) == 2
    with pytest.raises(ConfigError, match="samples"):
        EkfacConfig(samples=0)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _train_to_test(kind: str, damping: float) -> tuple[Problem, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(problem, train grads (n, p), mean test-loss gradient (1, p), exact loss_change_if_removed x n (n,))."""
    case = make_case(kind, n=200, d=6, classes=4, damping=damping, hessian="gauss_newton")
    test = make_case(kind, n=50, d=6, classes=4, seed=1)
    problem = case.problem
    test_problem = Problem(problem.model, problem.objective, problem.params, test.problem.train_loader, 50, 0.0)
    mean_grad = _grads(test_problem).mean(0, keepdim=True)
    train = _grads(problem)
    exact = train @ torch.linalg.solve(GradientSource(problem).dense_hessian(), mean_grad.T)[:, 0]
    return problem, train, mean_grad, exact


@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_train_to_test_influence_ranks_like_direct(kind, refine):
    """loss_change_if_removed on the mean loss of held-out rows: EK-FAC's ranking vs the exact solve."""
    problem, train, mean_grad, exact = _train_to_test(kind, 1e-2)
    approx = train @ _solver(damping=1e-2, refine=refine).fit(problem).ihvp(mean_grad)[0]
    assert _spearman(exact, approx) > 0.9


def test_refine_lifts_train_to_test_ranking_where_plain_ekfac_falls_short():
    """Less damping, an MLP: plain EK-FAC ranks below 0.9 Spearman; two refinement steps rank above it."""
    problem, train, mean_grad, exact = _train_to_test("mlp", 1e-3)
    rho = [_spearman(exact, train @ _solver(damping=1e-3, refine=r).fit(problem).ihvp(mean_grad)[0])
           for r in (0, 1, 2)]
    assert rho[0] < 0.9 <= rho[2] and rho[0] < rho[1] < rho[2]


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
def test_refine_converges_to_the_exact_inverse_of_the_damped_objective(hessian):
    """ihvp targets (H + (weight_decay + damping) I)^-1, H per problem.hessian, with the damping counted once."""
    problem = make_case("mlp", damping=1.0, hessian=hessian).problem  # damped enough that the exact H is PD
    hess = GradientSource(problem).dense_hessian()  # includes weight_decay + damping once
    assert torch.linalg.eigvalsh(hess).min() > 0
    v = _v(problem, k=4)
    expected = torch.linalg.solve(hess, v.T).T
    errors = []
    for refine in (0, 1, 2, 12):
        solver = _solver(damping=1.0, refine=refine).fit(problem)
        got = solver.ihvp(v)
        errors.append(float(((got - expected).norm(dim=1) / expected.norm(dim=1)).max()))
        info = solver.describe()
        assert info["refine"] == refine
        if refine:
            assert info["refine_solves"] == 4 and info["refine_hvp_passes"] <= refine + 1
            assert info["refine_residual_max"] < info["ekfac_residual_max"]
            residual = (v - GradientSource(problem).hvp(got)).norm(dim=1) / v.norm(dim=1)  # the recurrence's = true
            torch.testing.assert_close(max(residual.tolist()), info["refine_residual_max"], rtol=1e-6, atol=1e-12)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.2 * errors[0]
    assert errors[3] < 1e-9


def test_refine_zero_is_the_plain_factored_inverse_and_runs_no_hvp(monkeypatch):
    """refine 0 is the EK-FAC approximation as before: M = (Q diag Q^T)^-1 per layer, block-diagonal; and refine
    never touches half_ihvp or the gradient-free self-influence (no HVP per row)."""
    problem = make_case("mlp").problem
    plain, refined = _solver(refine=0).fit(problem), _solver(refine=2).fit(problem)
    blocks = torch.zeros(problem.params.size, problem.params.size, dtype=torch.float64)
    for layer in plain._layers:
        idx = _layer_index(problem, layer)
        q = torch.kron(layer.u_s, layer.u_a)
        blocks[idx[:, None], idx[None, :]] = q @ torch.diag(layer.diag.reshape(-1)) @ q.T
    v = _v(problem)
    monkeypatch.setattr(GradientSource, "hvp", lambda *a, **k: pytest.fail("refine 0 ran an HVP"))
    torch.testing.assert_close(plain.ihvp(v), torch.linalg.solve(blocks, v.T).T, **F64)
    torch.testing.assert_close(refined.factored_ihvp(v), plain.ihvp(v), rtol=0, atol=0)
    torch.testing.assert_close(refined.half_ihvp(v), plain.half_ihvp(v), rtol=0, atol=0)
    torch.testing.assert_close(refined.self_influence_fast(problem.train_loader, problem.n),
                               plain.self_influence_fast(problem.train_loader, problem.n), rtol=0, atol=0)
    assert "refine_solves" not in plain.describe()


def test_refine_batches_all_columns_in_each_hvp_pass(monkeypatch):
    problem = make_case("logreg").problem
    solver = _solver(refine=2).fit(problem)
    calls, hvp = [], GradientSource.hvp

    def counted(self, vectors, progress=None):
        calls.append(len(vectors))
        return hvp(self, vectors, progress)

    monkeypatch.setattr(GradientSource, "hvp", counted)
    v = _v(problem, k=5)
    v[3] = 0.0  # a zero right-hand side is answered without a solve
    out = solver.ihvp(v)
    assert calls == [4, 4, 4] and out.dtype == torch.float64 and out.shape == v.shape
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    torch.testing.assert_close(out[1], solver.ihvp(v[1:2])[0], **F64)  # columns are independent
    assert solver.describe()["refine_hvp_passes"] == 6


def test_refine_stops_on_non_positive_curvature_with_a_warning(monkeypatch):
    problem = make_case("logreg").problem
    solver = _solver(refine=2).fit(problem)
    monkeypatch.setattr(solver._source, "hvp", lambda vectors: -vectors)  # a negative definite "Hessian"
    v = _v(problem)
    torch.testing.assert_close(solver.ihvp(v), solver.factored_ihvp(v), rtol=0, atol=0)
    info = solver.describe()
    assert info["refine_iterations_max"] == 0 and "non-positive curvature" in info["warnings"][-1]


def test_refine_config_is_validated():
    assert EkfacConfig().refine == 4  # benchmarks/refine_agreement.py: 0.93-0.95 per test row vs direct (2: 0.83-0.85)
    with pytest.raises(ConfigError, match="refine"):
        EkfacConfig(refine=-1)
    with pytest.raises(ConfigError, match=r"solver\.ekfac\.refine: must be >= 0"):
        load_config(DIGITS, ["solver.ekfac.refine=-1"])
    with pytest.raises(ConfigError, match=r"solver\.ekfac\.refine"):
        load_config(DIGITS, ["solver.ekfac.refine=1.5"])


def test_pullback_falls_back_to_one_backward_per_column(monkeypatch):
    from influence_cli.solvers import ekfac_layers as ekfac

    problem = make_case("mlp").problem
    ref = _solver().fit(problem).ihvp(_v(problem))
    plain = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return plain(*args, **kwargs)

    monkeypatch.setattr(ekfac.torch.autograd, "grad", no_batching)
    torch.testing.assert_close(_solver().fit(problem).ihvp(_v(problem)), ref, **F64)


def test_rows_are_chunked_under_the_memory_budget_without_changing_results(monkeypatch):
    from influence_cli.solvers import ekfac_layers as ekfac

    problem = _problem("conv")
    ref = _solver().fit(problem)
    v, si = ref.ihvp(_v(problem)), ref.self_influence_fast(problem.train_loader, problem.n)
    monkeypatch.setattr(ekfac, "BLOCK_BYTES", 1)  # one row per chunk
    small = _solver().fit(problem)
    torch.testing.assert_close(small.ihvp(_v(problem)), v, **F64)
    blocks = list(small.self_influence_blocks(problem.train_loader))
    assert max(len(b.idx) for b in blocks) == 1
    torch.testing.assert_close(torch.cat([b.self_influence for b in blocks]), si, **F64)


def test_nan_loss_names_the_row():
    from influence_cli.errors import DataError

    case = make_case("logreg")
    solver = _solver().fit(case.problem)
    x = case.x.clone()
    x[3, 0] = float("nan")
    with pytest.raises(DataError, match="r3"):
        list(solver.self_influence_blocks(ListLoader(x, case.y, 16), ids=[f"r{i}" for i in range(len(x))]))
    with pytest.raises(DataError, match="NaN"):
        _solver().fit(Problem(case.problem.model, case.problem.objective, case.problem.params,
                              ListLoader(x, case.y, 16), len(x), 0.05))
