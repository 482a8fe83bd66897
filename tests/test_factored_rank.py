"""`rank` from layer factors (factored.py) equals the per-example-gradient path it replaces.

Exact references: GradientSource's vmap per-example gradients (float64, the one place that differentiates a row on
its own) for the factored gradients; the previous scoring path (INFL_RANK_SCORING=legacy: vmap gradients against
float64 solves) for the CSVs, on every solver, on models with Linear layers, a LayerNorm and a bare parameter
outside them, Linear layers run per position, and Conv2d; CE, binary and regression; params all, last_layer and a
prefix list. In float32 the held solves and the matmul are float32: the measured error is bounded below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ListLoader
from torch import nn

from influence_cli.commands.rank import SCORING_ENV, RankOptions
from influence_cli.commands.rank import rank as rank_command
from influence_cli.config import ModelConfig, load_config
from influence_cli.factored import FactoredGradients
from influence_cli.gradients import GradientSource
from influence_cli.models import build_model, save_checkpoint
from influence_cli.objective import Objective, ParamSpace, Problem
from influence_cli.run import Run

D = 6


# ---- models (also "test_factored_rank:<name>" factories for the end-to-end runs) -----------------------------------
class NormMLP(nn.Module):
    """Linear -> LayerNorm -> tanh -> Linear, times a bare parameter: LayerNorm and `scale` are not factored."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(D, 5), nn.LayerNorm(5), nn.Linear(5, outputs)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.inp(x)))) * self.scale


class PerPosition(nn.Module):
    """A Linear layer applied at each of 3 positions (a sequence), mean-pooled, then a head."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.tok, self.head = nn.Linear(2, 4), nn.Linear(4, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(x.reshape(len(x), 3, 2))).mean(1))


class SmallCNN(nn.Module):
    """Two Conv2d (padding, stride 2) on a 6 x 6 image and a Linear head."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3, stride=2)
        self.head = nn.Linear(8, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x.reshape(len(x), 1, 6, 6)))
        return self.head(torch.tanh(self.c2(h)).flatten(1))


class RowMixer(nn.Module):
    """Subtracts the batch mean: rows are not independent in a forward pass."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(D, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0, keepdim=True))


class Reused(nn.Module):
    """The head's weight is also used outside the head (F.linear): its gradient is not the head's alone."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(D, outputs), nn.Linear(outputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.head(h) + nn.functional.linear(h.square(), self.head.weight)


def norm_mlp(outputs: int = 3) -> nn.Module:
    return NormMLP(outputs)


def small_cnn(outputs: int = 3) -> nn.Module:
    return SmallCNN(outputs)


MODELS = {"mlp": lambda k: nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, k)), "norm_mlp": NormMLP,
          "per_position": PerPosition, "cnn": SmallCNN}
D_IN = {"cnn": 36}


def problem(kind: str, task: str, params, n: int = 30, batch: int = 8) -> Problem:
    g = torch.Generator().manual_seed(1)
    d = D_IN.get(kind, D)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    outputs = {"classification": 3, "binary": 1, "regression": 2}[task]
    y = {"classification": torch.randint(0, 3, (n,), generator=g), "binary": (x[:, 0] > 0).double(),
         "regression": torch.randn(n, 2, generator=g, dtype=torch.float64)}[task]
    model = MODELS[kind](outputs).double().eval().requires_grad_(False)
    return Problem(model, Objective(task, 1e-2), ParamSpace.select(model, params), ListLoader(x, y, batch), n, 1e-3)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("task", ["classification", "binary", "regression"])
@pytest.mark.parametrize("params", ["all", "last_layer", "prefix"])
def test_factored_gradients_equal_per_example_autograd(kind, task, params):
    prefixes = {"mlp": ("0",), "norm_mlp": ("inp", "norm", "scale"), "per_position": ("tok.weight", "head.bias"),
                "cnn": ("c1", "head.weight")}[kind]
    pr = problem(kind, task, prefixes if params == "prefix" else params)
    source, why = FactoredGradients.plan(pr)
    assert source is not None, why
    if kind == "norm_mlp" and params != "last_layer":
        assert source.rest is not None and "norm.weight" in source.rest.names  # LayerNorm: per-example autograd
    got = list(source.per_example(pr.train_loader))
    ref = list(GradientSource(pr).per_example(pr.train_loader))
    assert [b.idx.tolist() for b in got] == [b.idx.tolist() for b in ref]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.grads, b.grads, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.losses, b.losses, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.outputs, b.outputs, rtol=1e-12, atol=0)
    assert float(torch.cat([b.grads for b in got]).abs().max()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("params", ["all", "prefix"])
def test_float64_pass_from_factors_equals_the_block(kind, params):
    """rank's mean-test-loss row and grad J from the layer factors (factored.float64_pass) equal the float64 product
    and column sums of the block itself (layers, per-position layers, Conv2d, and parameters outside the layers)."""
    from influence_cli.commands.rank import _float64_pass

    prefixes = {"mlp": ("0",), "norm_mlp": ("inp", "norm", "scale"), "per_position": ("tok.weight", "head.bias"),
                "cnn": ("c1", "head.weight")}[kind]
    pr = problem(kind, "classification", prefixes if params == "prefix" else params)
    pr.model.float()
    pr.train_loader = ListLoader(pr.train_loader.x.float(), pr.train_loader.y, 8)
    source, why = FactoredGradients.plan(pr)
    assert source is not None, why
    mean = torch.randn(pr.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for block in source.per_example(pr.train_loader):
        assert block.factors is not None
        if kind == "mlp":  # one position: every layer's factors are smaller than its gradients and are kept
            assert len(block.factors) == len(source.layers)
        got_scores, got_sums = source.float64_pass(block, mean)
        want_scores, want_sums = _float64_pass(mean, block.grads)
        # the block's entries are float32 products r a; the factors' are exact: float32 rounding of |g| |mean|
        scale = float(block.grads.double().norm(dim=1).max() * mean.norm())
        torch.testing.assert_close(got_scores, want_scores, rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(got_sums, want_sums, rtol=1e-6, atol=1e-6 * float(block.grads.abs().max()))
        assert got_scores.dtype == torch.float64 and float(got_sums.abs().max()) > 0


@pytest.mark.parametrize("model", [RowMixer, Reused])
def test_plan_declines_when_the_factors_are_not_the_gradient(model):
    pr = problem("mlp", "classification", "all")
    pr.model = model(3).double().eval().requires_grad_(False)
    pr.params = ParamSpace.select(pr.model, "all")
    source, why = FactoredGradients.plan(pr)
    assert source is None and "differ" in why


def test_a_layer_called_twice_is_scored_by_per_example_autograd():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(D, D), nn.Linear(D, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))

    pr = problem("mlp", "classification", "all")
    pr.model = Twice().double().eval().requires_grad_(False)
    pr.params = ParamSpace.select(pr.model, "all")
    source, _ = FactoredGradients.plan(pr)
    assert source is not None and source.rest is not None and source.rest.names == ("a.weight", "a.bias")
    got = torch.cat([b.grads for b in source.per_example(pr.train_loader)])
    ref = torch.cat([b.grads for b in GradientSource(pr).per_example(pr.train_loader)])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# ---- rank end to end: the new path against the legacy one -----------------------------------------------------------
def _config(root: Path, arch: str, kwargs: dict, d: int, task: str, dtype: str, solver: dict, params="all") -> Path:
    g = np.random.default_rng(0)
    x = g.normal(size=(60, d))
    w = g.normal(size=(d, 3))
    y = {"classification": (x @ w + 0.7 * g.normal(size=(60, 3))).argmax(1),
         "binary": (x[:, 0] + 0.5 * g.normal(size=60) > 0).astype(np.int64),
         "regression": (x @ w[:, 0] + 0.3 * g.normal(size=60)).astype(np.float32)}[task]
    np.savez(root / "train.npz", x=x[:48].astype(np.float32), y=y[:48])
    np.savez(root / "test.npz", x=x[48:].astype(np.float32), y=y[48:])
    torch.manual_seed(0)
    save_checkpoint(build_model(ModelConfig(arch=arch, kwargs=kwargs)), root / "m.pt")
    doc = {"model": {"arch": arch, "kwargs": kwargs, "checkpoint": "m.pt"}, "task": task, "dtype": dtype,
           "device": "cpu", "batch_size": 8, "solver": solver, "params": params, "weight_decay": 0.01,
           "output": {"dir": "reports"}, "cache": {"enabled": False},
           "data": {"train": {"format": "tensors", "path": "train.npz"},
                    "test": {"format": "tensors", "path": "test.npz"}}}
    (root / "config.yaml").write_text(json.dumps(doc))
    return root / "config.yaml"


def _rank(path: Path, monkeypatch, legacy: bool, **options):
    if legacy:
        monkeypatch.setenv(SCORING_ENV, "legacy")
    else:
        monkeypatch.delenv(SCORING_ENV, raising=False)
    return rank_command(Run.open(load_config(path), "rank", need_test=True), RankOptions(**options))


def _compare(new, old, rtol: float) -> None:
    for name in ("helpful.csv", "harmful.csv", "overall.csv"):
        a, b = new.tables[name], old.tables[name]
        assert a.drop(columns="loss_change_if_removed").equals(b.drop(columns="loss_change_if_removed")), name
        np.testing.assert_allclose(a.loss_change_if_removed, b.loss_change_if_removed, rtol=rtol, atol=0, err_msg=name)
    assert new.summary["grad_norm_at_checkpoint"] == pytest.approx(old.summary["grad_norm_at_checkpoint"], rel=1e-9)
    assert new.summary["objective_at_checkpoint"] == pytest.approx(old.summary["objective_at_checkpoint"], rel=1e-12)


MLP = ("mlp", {"in_features": 5, "hidden": [6], "num_classes": 3, "activation": "tanh"}, 5)


@pytest.mark.parametrize("solver", [{"name": "direct"}, {"name": "cg"}, {"name": "arnoldi"},
                                    {"name": "ekfac", "ekfac": {"refine": 0}}, {"name": "ekfac"},
                                    {"name": "lissa", "hessian": "gauss_newton", "lissa": {"depth": 50, "repeats": 1}}],
                         ids=lambda s: s["name"] + str(s.get("ekfac", "")))
def test_rank_equals_the_legacy_path_for_every_solver(tmp_path, monkeypatch, solver):
    path = _config(tmp_path, *MLP, "classification", "float64", solver)
    new = _rank(path, monkeypatch, False, top=5)
    assert new.summary["scoring"]["gradients"] == "factored"
    _compare(new, _rank(path, monkeypatch, True, top=5), rtol=1e-9)


@pytest.mark.parametrize(("arch", "kwargs", "d", "task", "params"), [
    ("test_factored_rank:norm_mlp", {"outputs": 1}, D, "binary", ["inp", "norm", "scale"]),
    ("test_factored_rank:norm_mlp", {"outputs": 1}, D, "regression", "last_layer"),
    ("test_factored_rank:small_cnn", {"outputs": 3}, 36, "classification", "all"),
], ids=["norm-binary-prefix", "norm-regression-last", "cnn-ce-all"])
def test_rank_equals_the_legacy_path_across_models_tasks_and_params(tmp_path, monkeypatch, arch, kwargs, d, task,
                                                                    params):
    path = _config(tmp_path, arch, kwargs, d, task, "float64", {"name": "direct"}, params)
    new = _rank(path, monkeypatch, False, top=4, test_ids=["3", "0", "7"])
    _compare(new, _rank(path, monkeypatch, True, top=4, test_ids=["3", "0", "7"]), rtol=1e-9)


def test_float32_rank_is_within_the_measured_error_of_the_legacy_float64_path(tmp_path, monkeypatch):
    """float32 runs: the test solves are held and multiplied in float32 (the legacy path: float64 solves x the
    float32 gradients); overall.csv stays float64. Measured here: overall.csv identical, pair values within 3e-7
    of each test row's largest |value| (the bounds, 1e-6 and 1e-5, leave room for other BLAS and blockings)."""
    path = _config(tmp_path, *MLP, "classification", "float32", {"name": "direct"})
    new, old = _rank(path, monkeypatch, False, top=48), _rank(path, monkeypatch, True, top=48)
    assert new.summary["scoring"]["solves_dtype"] == "float32"
    a, b = new.tables["overall.csv"], old.tables["overall.csv"]
    assert a.id.tolist() == b.id.tolist()
    scale = float(b.loss_change_if_removed.abs().max())
    assert float((a.loss_change_if_removed - b.loss_change_if_removed).abs().max()) <= 1e-6 * scale
    for name in ("helpful.csv", "harmful.csv"):  # top = n: every pair, matched by (test_id, train_id)
        key = ["test_id", "train_id"]
        m = new.tables[name].merge(old.tables[name], on=key, suffixes=("_new", "_old"))
        assert len(m) == len(new.tables[name])
        per_test = m.groupby("test_id").loss_change_if_removed_old.transform(lambda v: v.abs().max())
        err = ((m.loss_change_if_removed_new - m.loss_change_if_removed_old).abs() / per_test).max()
        assert err <= 1e-5, err


def test_sharded_and_resumed_rank_on_the_factored_path_equals_one_run(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    path = _config(tmp_path, "test_factored_rank:norm_mlp", {"outputs": 3}, D, "classification", "float32",
                   {"name": "ekfac", "ekfac": {"refine": 0}}, ["inp", "head"])
    doc = json.loads(path.read_text())
    doc["cache"] = {"enabled": True, "shard_rows": 16}
    path.write_text(json.dumps(doc))
    monkeypatch.delenv(SCORING_ENV, raising=False)
    ids = ["--test-ids", "1,4,9"]
    single = str(tmp_path / "single")
    assert run_cli(capsys, "rank", "-c", str(path), "-o", single, "--no-cache", "--quiet", *ids)[0] == 0
    out = str(tmp_path / "sharded")
    for i in range(3):
        assert run_cli(capsys, "rank", "-c", str(path), "-o", out, "--shard", f"{i}/3", *ids)[0] == 0
    assert run_cli(capsys, "rank", "-c", str(path), "-o", out, "--merge", "--quiet", *ids)[0] == 0
    for name in ("overall.csv", "helpful.csv", "harmful.csv"):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    frame = pd.read_csv(tmp_path / "single" / "overall.csv")
    assert len(frame) == 48


# ---- selfcheck: EK-FAC's pass also gives the objective's gradient ---------------------------------------------------
@pytest.mark.parametrize("kind", ["cnn", "per_position"])
def test_ekfac_scored_rows_equal_the_solvers_own_pass_and_sum_the_gradients(kind):
    from influence_cli.config import SolverConfig
    from influence_cli.factored import ekfac_scored_rows
    from influence_cli.solvers.ekfac import EkfacSolver

    pr = problem(kind, "classification", "all")
    solver = EkfacSolver(SolverConfig(name="ekfac")).fit(pr)
    mine = list(ekfac_scored_rows(pr, solver.state(), pr.train_loader))
    ref = list(solver.self_influence_blocks(pr.train_loader))
    torch.testing.assert_close(torch.cat([b.self_influence for b in mine]),
                               torch.cat([b.self_influence for b in ref]), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([b.losses for b in mine]), torch.cat([b.losses for b in ref]), rtol=0, atol=0)
    summed = sum(b.grad_sum for b in mine)
    exact = sum(b.grads.sum(0) for b in GradientSource(pr).per_example(pr.train_loader))
    torch.testing.assert_close(summed, exact, rtol=1e-10, atol=1e-12)


def test_ekfac_selfcheck_takes_the_objective_gradient_from_its_scoring_pass(tmp_path, monkeypatch):
    from influence_cli.commands.selfcheck import SelfcheckOptions, selfcheck

    path = _config(tmp_path, *MLP, "classification", "float64", {"name": "ekfac", "ekfac": {"refine": 0}})
    run = Run.open(load_config(path), "selfcheck")
    calls = []
    monkeypatch.setattr(GradientSource, "objective_gradient", lambda self: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("a separate objective pass")))
    summary = selfcheck(run, SelfcheckOptions(gallery="none")).summary
    monkeypatch.undo()
    value, grad = GradientSource(run.problem).objective_gradient()
    assert not calls
    assert summary["objective_at_checkpoint"] == pytest.approx(value, rel=1e-12)
    assert summary["grad_norm_at_checkpoint"] == pytest.approx(float(grad.norm()), rel=1e-10)
