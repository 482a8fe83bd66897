"""FastIF narrowing (`rank --knn`): neighbors vs brute force, grad and kfac vs explicit per-example gradients,
the candidate loader, K >= n reproducing the full ranking, and bad options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from influence_cli import cli, knn
from influence_cli.commands.rank import RankOptions
from influence_cli.commands.rank import rank as rank_command
from influence_cli.config import Config, ModelConfig, load_config
from influence_cli.data import CastLoader, Split, TensorRows, make_loader
from influence_cli.errors import ConfigError
from influence_cli.knn import candidate_loader, check_knn, grad_similarity, knn_neighbors
from influence_cli.models import build_model, save_checkpoint
from influence_cli.objective import Objective, ParamSpace, Problem
from influence_cli.run import Run


def split(x: torch.Tensor, y: torch.Tensor, role: str = "train", task: str = "classification") -> Split:
    n = len(x)
    return Split(role, [f"{role}{i}" for i in range(n)], y, TensorRows(x, y), "", pd.DataFrame(index=range(n)),
                 task=task)


def problem_for(model: nn.Module, train: Split, task: str = "classification") -> Problem:
    model = model.double().eval().requires_grad_(False)
    loader = CastLoader(make_loader(train, 7), torch.float64)
    return Problem(model, Objective(task, 1e-2), ParamSpace.select(model, "all"), loader, train.n, 1e-3)


def data(n: int, d: int, task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if task == "classification":
        return x, torch.randint(0, 3, (n,), generator=g)
    if task == "binary":
        return x, torch.randint(0, 2, (n,), generator=g).double()
    return x, torch.randn(n, 2, generator=g, dtype=torch.float64)


# ---- neighbors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_feature_neighbors_match_brute_force(metric):
    # logreg: the last Linear layer's input is x itself, so the features are the rows as written
    x, y = data(30, 4, "classification", 0)
    tx, ty = data(5, 4, "classification", 1)
    train, test = split(x, y), split(tx, ty, "test")
    problem = problem_for(nn.Linear(4, 3), train)
    rows = [3, 0, 4]
    got = knn_neighbors(problem, train, CastLoader(make_loader(test, 2), torch.float64), rows, 6, metric).rows
    a, b = tx.numpy()[rows], x.numpy()
    if metric == "cosine":
        sim = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    else:
        sim = -((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(got.numpy(), np.argsort(-sim, axis=1, kind="stable")[:, :6])


def _layer_grads(model: nn.Module, obj: Objective, x: torch.Tensor, y: torch.Tensor, prefix: str) -> torch.Tensor:
    """Explicit per-example gradients of the loss in one Linear layer's weight and bias, (B, C*(d+1))."""
    params = {k: v for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return obj.per_example_loss(functional_call(model, p, (xi[None],)), yi[None])[0]

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[f"{prefix}.weight"].flatten(1), g[f"{prefix}.bias"].flatten(1)], dim=1)


@pytest.mark.parametrize("task", ["classification", "binary", "regression"])
def test_grad_similarity_is_the_gradient_dot_product(task):
    x, y = data(25, 4, task, 0)
    tx, ty = data(4, 4, task, 1)
    width = 3 if task == "classification" else 1 if task == "binary" else 2
    torch.manual_seed(0)
    train, test = split(x, y, task=task), split(tx, ty, "test", task)
    problem = problem_for(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, width)), train, task)
    test_loader = CastLoader(make_loader(test, 3), torch.float64)
    sim = grad_similarity(problem, test_loader, problem.train_loader)
    full = [torch.cat([_layer_grads(problem.model, problem.objective, a, b, layer) for layer in ("0", "2")], dim=1)
            for a, b in ((tx, ty), (x, y))]
    explicit = full[0] @ full[1].T  # all parameters selected: the whole per-example gradient
    torch.testing.assert_close(sim, explicit, rtol=1e-10, atol=1e-12)
    # the metric keeps, per test row, the K most positive then the K most negative of these
    got = knn_neighbors(problem, train, test_loader, [0, 1, 2, 3], 4, "grad").rows
    order = np.argsort(-explicit.numpy(), axis=1, kind="stable")
    np.testing.assert_array_equal(got[:, :4].numpy(), order[:, :4])
    np.testing.assert_array_equal(got[:, 4:].numpy(), order[:, ::-1][:, :4])
    # only the selected parameters count: the last layer alone, and its weight without its bias
    for names, cols in ((("2.",), slice(None)), (("2.weight",), slice(0, -width))):
        last = dataclasses.replace(problem, params=ParamSpace.select(problem.model, names))
        g = [_layer_grads(problem.model, problem.objective, a, b, "2")[:, cols] for a, b in ((tx, ty), (x, y))]
        torch.testing.assert_close(grad_similarity(last, test_loader, problem.train_loader), g[0] @ g[1].T,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factor_rows", [10_000, 5])
def test_kfac_metric_is_the_block_kronecker_preconditioned_gradient_product(monkeypatch, factor_rows):
    x, y = data(25, 4, "classification", 0)
    tx, ty = data(4, 4, "classification", 1)
    torch.manual_seed(0)
    train, test = split(x, y), split(tx, ty, "test")
    problem = problem_for(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), train)
    monkeypatch.setattr(knn, "FACTOR_ROWS", factor_rows)
    used = slice(None, None, 1 if factor_rows >= 25 else 5)  # 5: the factors come from rows 0, 5, ..., 20
    ones = torch.ones(25, 1, dtype=torch.float64)
    explicit = 0
    for layer, inputs, width in (("0", x, 6), ("2", problem.model[:2](x), 3)):
        gz, gt = (_layer_grads(problem.model, problem.objective, a, b, layer) for a, b in ((x, y), (tx, ty)))
        # independent factors: A from the layer's inputs computed by hand, S from the bias gradients (= r)
        feats, r = torch.cat([inputs, ones], dim=1)[used], gz[used, -width:]
        factors = [feats.T @ feats / len(feats), r.T @ r / len(r)]
        inv = [torch.linalg.inv(f + knn.KFAC_DAMPING * f.diagonal().mean() * torch.eye(len(f), dtype=f.dtype))
               for f in factors]

        def vec(g, width=width, d=inputs.shape[1]):  # [weight (C, d), bias (C,)] -> rows of the (C, d + 1) matrix
            return torch.cat([g[:, :-width].reshape(len(g), width, d), g[:, -width:, None]], dim=2).reshape(len(g), -1)

        explicit = explicit + vec(gt) @ torch.kron(inv[1], inv[0]) @ vec(gz).T
    order = np.argsort(-explicit.numpy(), axis=1, kind="stable")
    test_loader = CastLoader(make_loader(test, 3), torch.float64)
    for budget in (knn.BLOCK_BYTES, 1):  # 1: one row per batch, (a, r) not kept: a second, forward-only pass
        monkeypatch.setattr(knn, "BLOCK_BYTES", budget)
        got = knn_neighbors(problem, train, test_loader, [0, 1, 2, 3], 4, "kfac").rows
        np.testing.assert_array_equal(got[:, :4].numpy(), order[:, :4])
        np.testing.assert_array_equal(got[:, 4:].numpy(), order[:, ::-1][:, :4])


def test_neighbors_also_give_the_objective_and_its_gradient():
    x, y = data(20, 4, "classification", 0)
    train = split(x, y)
    problem = problem_for(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), train)
    found = knn_neighbors(problem, train, problem.train_loader, [0], 3, "cosine")
    flat = problem.params.flatten(problem.params.values(problem.model)).clone().requires_grad_(True)
    out = functional_call(problem.model, problem.params.unflatten(flat), (x,))
    value = problem.objective.per_example_loss(out, y).mean() + problem.objective.regularizer(flat)
    torch.testing.assert_close(found.objective, float(value.detach()), rtol=1e-12, atol=0)
    torch.testing.assert_close(found.objective_grad, torch.autograd.grad(value, flat)[0], rtol=1e-10, atol=1e-12)


# ---- candidate loader ------------------------------------------------------------------------------------------
class Lazy(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("lazy", [False, True])
def test_candidate_loader_yields_exactly_the_candidates_in_dense_batches(lazy):
    x, y = torch.arange(40.0).reshape(20, 2), torch.arange(20) % 3
    train = split(x, y)
    if lazy:
        train = dataclasses.replace(train, dataset=Lazy(x, y))
    rows = [17, 2, 9, 2, 11, 0, 19, 5]
    batches = list(candidate_loader(train, rows, 3, torch.float64))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    idx = torch.cat([b[0] for b in batches])
    assert idx.tolist() == sorted(set(rows))
    assert all(b[1].dtype == torch.float64 for b in batches)
    torch.testing.assert_close(torch.cat([b[1] for b in batches]), x[idx].double())
    assert torch.equal(torch.cat([b[2] for b in batches]), y[idx])
    assert len(list(candidate_loader(train, rows, 3, torch.float64))) == 3  # re-iterable


# ---- through rank() ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Config:
    root: Path = tmp_path_factory.mktemp("knn")
    g = np.random.default_rng(0)
    x = g.normal(size=(48, 5)).astype(np.float32)
    y = (x[:, :3] + 0.8 * g.normal(size=(48, 3))).argmax(1)
    np.savez(root / "train.npz", x=x[:40], y=y[:40])
    np.savez(root / "test.npz", x=x[40:], y=y[40:])
    spec = {"arch": "mlp", "kwargs": {"in_features": 5, "hidden": [6], "num_classes": 3, "activation": "tanh"}}
    torch.manual_seed(0)
    save_checkpoint(build_model(ModelConfig(arch=spec["arch"], kwargs=spec["kwargs"])), root / "m.pt")
    doc = {"model": {**spec, "checkpoint": "m.pt"}, "dtype": "float64", "device": "cpu", "batch_size": 16,
           "solver": {"name": "direct"}, "output": {"dir": "reports"},
           "data": {"train": {"format": "tensors", "path": "train.npz"},
                    "test": {"format": "tensors", "path": "test.npz"}}}
    if "cache" in {f.name for f in dataclasses.fields(Config)}:
        doc["cache"] = {"enabled": False}
    (root / "config.yaml").write_text(json.dumps(doc))
    return load_config(root / "config.yaml")


def rank_run(cfg, **options):
    return rank_command(Run.open(cfg, "rank", need_test=True), RankOptions(**options))


@pytest.fixture(scope="module")
def full(cfg):
    return rank_run(cfg, top=5)


@pytest.mark.parametrize("metric", ["cosine", "l2", "grad", "kfac"])
def test_knn_with_k_at_least_n_equals_the_full_ranking(cfg, full, metric):
    narrowed = rank_run(cfg, top=5, knn=40 if metric in ("cosine", "l2") else 100, knn_metric=metric)
    for name in ("helpful.csv", "harmful.csv", "overall.csv"):
        pd.testing.assert_frame_equal(narrowed.tables[name], full.tables[name], check_exact=False, rtol=1e-12)
    info = narrowed.summary["knn"]
    assert info["scored_rows"] == 40 and info["scored_fraction"] == 1.0 and info["metric"] == metric
    assert info["candidates_per_test_row"] == (40 if metric in ("cosine", "l2") else 80)
    assert narrowed.summary["objective_at_checkpoint"] == pytest.approx(full.summary["objective_at_checkpoint"])
    assert narrowed.summary["grad_norm_at_checkpoint"] == pytest.approx(full.summary["grad_norm_at_checkpoint"])
    json.dumps(narrowed.manifest)


def test_knn_ranks_each_test_rows_own_candidates(cfg):
    every_pair = rank_run(cfg, top=40)  # top = n: every (test, train) pair's value
    narrowed = rank_run(cfg, top=5, knn=3, knn_metric="grad", test_ids=["5", "2"])
    inp = Run.open(cfg, "rank", need_test=True)
    test_loader = CastLoader(make_loader(inp.test, 16), torch.float64)
    own = knn_neighbors(inp.problem, inp.train, test_loader, [5, 2], 3, "grad").rows
    assert narrowed.summary["knn"]["scored_rows"] == len(torch.unique(own)) <= 12
    for t, test_id in enumerate(["5", "2"]):
        allowed = {inp.train.ids[i] for i in own[t].tolist()}
        for name, descending in (("helpful.csv", True), ("harmful.csv", False)):
            pairs = every_pair.tables[name]
            expected = pairs[(pairs.test_id == test_id) & pairs.train_id.isin(allowed)]
            expected = expected.sort_values("loss_change_if_removed", ascending=not descending).head(5)
            got = narrowed.tables[name][narrowed.tables[name].test_id == test_id]
            assert got.train_id.tolist() == expected.train_id.tolist()
            np.testing.assert_allclose(got.loss_change_if_removed, expected.loss_change_if_removed, rtol=1e-10)
    assert len(narrowed.tables["overall.csv"]) == narrowed.summary["knn"]["scored_rows"]


@pytest.mark.parametrize(("k", "metric"), [(0, "cosine"), (-3, "l2"), (5, "cos"), (5, "")])
def test_bad_knn_options_are_config_errors(cfg, k, metric):
    with pytest.raises(ConfigError, match="--knn"):
        check_knn(k, metric)
    with pytest.raises(ConfigError, match="--knn"):
        RankOptions(knn=k, knn_metric=metric)


def test_bad_knn_on_the_command_line_exits_2(capsys, cfg, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["rank", "-c", str(cfg.source), "-o", str(tmp_path), "--knn", "0", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--knn" in err


class _Sequence(nn.Module):
    """A Linear layer applied per position (3-D input), then a pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x.reshape(len(x), 2, 2))).mean(dim=1))


def test_layers_the_gradient_metrics_cannot_read_are_config_errors_that_say_which():
    x, y = data(12, 4, "classification", 0)
    train = split(x, y)
    problem = problem_for(_Sequence(), train)
    # the per-position layer is left out (and named); the head alone gives the same candidates as selecting it
    found = knn_neighbors(problem, train, problem.train_loader, [0, 1], 3, "kfac")
    assert found.layers == ("head",) and found.layers_skipped == ("embed",)
    head_only = dataclasses.replace(problem, params=ParamSpace.select(problem.model, ("head.",)))
    head = knn_neighbors(head_only, train, problem.train_loader, [0, 1], 3, "kfac")
    assert head.layers_skipped == () and torch.equal(head.rows, found.rows) and found.rows.shape == (2, 6)
    embed_only = dataclasses.replace(problem, params=ParamSpace.select(problem.model, ("embed.",)))
    with pytest.raises(ConfigError, match=r"\(embed\) run on more than one vector per row") as e:
        knn_neighbors(embed_only, train, problem.train_loader, [0], 3, "kfac")
    assert "cosine" in e.value.hint and "params:" in e.value.hint
    conv = problem_for(nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2, 3)),
                       train)
    conv_only = dataclasses.replace(conv, params=ParamSpace.select(conv.model, ("1.",)))
    with pytest.raises(ConfigError, match="none of the selected parameters"):
        knn_neighbors(conv_only, train, conv.train_loader, [0], 3, "grad")
    assert knn_neighbors(conv_only, train, conv.train_loader, [0], 3, "cosine").rows.shape == (1, 3)
