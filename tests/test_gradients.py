"""Per-example gradients and HVPs against plain autograd, one row / one vector at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import ListLoader, make_case

from influence_cli.errors import DataError
from influence_cli.gradients import GradientSource


def _reference_grads(case):
    rows = []
    flat = case.flat_params().clone().requires_grad_(True)
    pr = case.problem
    for i in range(len(case.x)):
        params = {k: v.detach() for k, v in pr.model.named_parameters()}
        params.update(pr.params.unflatten(flat))
        out = torch.func.functional_call(pr.model, params, (case.x[i : i + 1],))
        loss = pr.objective.per_example_loss(out, case.y[i : i + 1])[0]
        rows.append(torch.autograd.grad(loss, flat)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["ridge", "logreg", "binary", "mlp"])
def test_per_example_matches_autograd(kind):
    case = make_case(kind)
    blocks = list(GradientSource(case.problem).per_example(case.problem.train_loader))
    grads = torch.cat([b.grads for b in blocks])
    idx = torch.cat([b.idx for b in blocks])
    assert idx.tolist() == list(range(len(case.x)))
    torch.testing.assert_close(grads, _reference_grads(case), rtol=1e-10, atol=1e-12)


def test_per_example_invariant_to_batch_size_and_block_budget():
    case = make_case("mlp")
    ref = torch.cat([b.grads for b in GradientSource(case.problem).per_example(case.problem.train_loader)])
    small = GradientSource(case.problem, block_bytes=1)  # one row per block
    got = torch.cat([b.grads for b in small.per_example(ListLoader(case.x, case.y, 7))])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["ridge", "logreg", "binary", "mlp"])
def test_dense_hessian_matches_autograd(kind):
    case = make_case(kind)
    torch.testing.assert_close(GradientSource(case.problem).dense_hessian(), case.exact_hessian(),
                               rtol=1e-9, atol=1e-11)


def test_hvp_batched_equals_dense():
    case = make_case("mlp")
    source = GradientSource(case.problem)
    v = torch.randn(4, case.problem.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(source.hvp(v), v @ case.exact_hessian(), rtol=1e-9, atol=1e-11)


def test_gauss_newton_is_exact_for_linear_models_and_psd_for_mlp():
    lin = make_case("logreg", hessian="gauss_newton")
    torch.testing.assert_close(GradientSource(lin.problem).dense_hessian(), lin.exact_hessian(), rtol=1e-9, atol=1e-11)
    mlp = make_case("mlp", hessian="gauss_newton", damping=0.0, weight_decay=0.0)
    eig = torch.linalg.eigvalsh(GradientSource(mlp.problem).dense_hessian())
    assert eig.min() > -1e-10
    exact = torch.linalg.eigvalsh(make_case("mlp", damping=0.0, weight_decay=0.0).exact_hessian())
    assert not torch.allclose(eig, exact)  # the MLP's exact Hessian has second-order terms GN drops


def test_objective_gradient_matches_autograd():
    case = make_case("logreg")
    value, grad = GradientSource(case.problem).objective_gradient()
    flat = case.flat_params().clone().requires_grad_(True)
    loss = case.flat_loss(flat)
    loss.backward()
    assert value == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(grad, flat.grad, rtol=1e-10, atol=1e-12)


def test_nan_input_names_the_row():
    case = make_case("logreg")
    case.x[5, 0] = float("nan")
    ids = [f"row{i}" for i in range(len(case.x))]
    with pytest.raises(DataError, match="row5"):
        list(GradientSource(case.problem).per_example(case.problem.train_loader, ids))


@pytest.mark.parametrize("kind", ["ridge", "logreg", "binary"])
def test_linear_head_fast_path_equals_generic_hvps(kind):
    case = make_case(kind)
    source = GradientSource(case.problem)
    p = case.problem.params.size
    generic = source.hvp(torch.eye(p, dtype=torch.float64))
    torch.testing.assert_close(source.dense_hessian(), 0.5 * (generic + generic.T), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("select", ["last_layer", ("2.weight",), ("2.bias",)])
def test_linear_head_of_a_network(select):
    from influence_cli.objective import ParamSpace

    case = make_case("mlp")
    case.problem.params = ParamSpace.select(case.problem.model, select)
    source = GradientSource(case.problem)
    p = case.problem.params.size
    generic = source.hvp(torch.eye(p, dtype=torch.float64))
    torch.testing.assert_close(source.dense_hessian(), 0.5 * (generic + generic.T), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(source.dense_hessian(), case.exact_hessian(), rtol=1e-9, atol=1e-11)


def test_selfcheck_gradient_norm_equals_the_objective_gradient(tmp_path):
    """selfcheck derives grad J from its per-example pass; it must equal the direct computation."""
    from pathlib import Path

    from influence_cli.commands.selfcheck import selfcheck
    from influence_cli.config import load_config
    from influence_cli.run import Run

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "digits.yaml", [f"output.dir={tmp_path}"])
    run = Run.open(cfg, "selfcheck")
    result = selfcheck(run)
    value, grad = GradientSource(run.problem).objective_gradient()
    assert result.summary["objective_at_checkpoint"] == pytest.approx(value, rel=1e-6)
    assert result.summary["grad_norm_at_checkpoint"] == pytest.approx(float(grad.norm()), rel=1e-3, abs=1e-7)


def test_rank_gradient_norm_equals_the_objective_gradient(tmp_path):
    """rank also derives grad J from its first pass over the training rows."""
    from pathlib import Path

    from influence_cli.commands.rank import RankOptions, rank
    from influence_cli.config import load_config
    from influence_cli.run import Run

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "digits.yaml", [f"output.dir={tmp_path}"])
    run = Run.open(cfg, "rank", need_test=True)
    result = rank(run, RankOptions(test_ids=["d0022"]))
    value, grad = GradientSource(run.problem).objective_gradient()
    assert result.summary["objective_at_checkpoint"] == pytest.approx(value, rel=1e-6)
    assert result.summary["grad_norm_at_checkpoint"] == pytest.approx(float(grad.norm()), rel=1e-3, abs=1e-7)


def test_param_space_split_is_the_model_as_a_function_of_the_selected_parameters():
    from torch import nn

    from influence_cli.objective import ParamSpace

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).float().eval()
    space = ParamSpace.select(model, ("2",))
    selected, fixed = space.split(model, torch.float64)
    assert tuple(selected) == space.names == ("2.weight", "2.bias")
    assert set(fixed) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                          "1.num_batches_tracked"}
    assert all(t.dtype == torch.float64 and not t.requires_grad for t in selected.values())
    assert fixed["1.num_batches_tracked"].dtype == torch.long  # only floating-point tensors are cast
    x = torch.randn(5, 3)
    doubled = {n: 2 * t for n, t in selected.items()}
    out = torch.func.functional_call(model.double(), {**doubled, **fixed}, (x.double(),))
    with torch.no_grad():
        model[2].weight.mul_(2)
        model[2].bias.mul_(2)
        torch.testing.assert_close(out, model(x.double()))
