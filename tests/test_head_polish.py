"""The head-only polish (params: last_layer on the frozen body's features, head.py) reaches the same head as
the full-network polish it replaces (every L-BFGS evaluation through the whole model in float64), and is only
taken where the head really is the model's last step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ListLoader
from torch import nn

from influence_cli.config import TrainConfig
from influence_cli.data import CastLoader
from influence_cli.head import frozen_head, head_features
from influence_cli.models import cnn
from influence_cli.objective import Objective, ParamSpace
from influence_cli.train import minimize, polish

RECIPE = TrainConfig(optimizer="lbfgs", lr=1.0, epochs=200, tol=1e-7)


def _data(shape, n=96, classes=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _old_polish(model, names, objective, loader, n, config):
    """What `infl train` did before head.py: the whole model in float64 on every evaluation."""
    model.to(torch.float64)
    named = dict(model.named_parameters())
    return minimize(model, [named[k] for k in names], objective, CastLoader(loader, torch.float64), n, config)


def _both(model, x, y, config=RECIPE, **kwargs):
    names = ParamSpace.select(model, "last_layer").names
    objective = Objective("classification", 1e-2)
    loader = ListLoader(x, y, 32)
    old = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _old_polish(old, names, objective, loader, len(x), config)
    new = polish(model, names, objective, loader, len(x), config, 32, **kwargs)
    return names, before, model, old, ref, new


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlp_head_polish_gives_the_full_network_polish_head(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    x, y = _data((6,), dtype=dtype)
    names, before, model, old, ref, new = _both(model, x, y)
    assert new.head_only and not ref.head_only and new.converged and ref.converged
    tol = 1e-7 if dtype == torch.float64 else 1e-4  # float32: the features are what the saved float32 model computes
    for k in names:
        assert not torch.equal(dict(model.named_parameters())[k].double(), before[k].double())  # it moved
        torch.testing.assert_close(dict(model.named_parameters())[k].double(), dict(old.named_parameters())[k],
                                   rtol=tol, atol=tol)
    assert new.objective == pytest.approx(ref.objective, rel=1e-6)
    assert new.accuracy == ref.accuracy and 0 < new.accuracy <= 1
    for k, v in model.state_dict().items():  # the body is untouched
        if k not in names:
            assert torch.equal(v, before[k])


def test_cnn_head_polish_gives_the_full_network_polish_head():
    torch.manual_seed(1)
    model = cnn(in_channels=1, num_classes=3, image_size=12).eval()
    x, y = _data((1, 12, 12), n=64)
    names, _, model, old, ref, new = _both(model, x, y)
    assert new.head_only
    for k in names:
        torch.testing.assert_close(dict(model.named_parameters())[k].double(), dict(old.named_parameters())[k],
                                   rtol=1e-4, atol=1e-4)


def test_features_too_large_for_memory_fall_back_to_the_full_network(monkeypatch):
    import influence_cli.head as head

    monkeypatch.setattr(head, "MEMORY_SHARE", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = _data((4,), n=40, dtype=torch.float64)
    names, _, model, old, ref, new = _both(model, x, y)
    assert not new.head_only
    for k in names:
        torch.testing.assert_close(dict(model.named_parameters())[k], dict(old.named_parameters())[k])


def test_progress_names_rows_then_evaluations_with_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = _data((4,), n=40)
    seen = []
    _both(model, x, y, progress=lambda phase, done, total, **info: seen.append((phase, done, total, info)))
    phases = [s[0] for s in seen]
    assert phases[0] == "features" and seen[phases.index("features")][2] == 40
    polish_events = [s for s in seen if s[0] == "polish"]
    assert polish_events and all(s[3]["unit"] == "evaluations" and s[3]["loss"] > 0 for s in polish_events)
    assert polish_events[-1][3]["loss"] <= polish_events[0][3]["loss"]


class _Scaled(nn.Module):  # something after the head: its input does not give the model's output
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return 2 * self.head(torch.tanh(self.body(x)))


class _Tied(nn.Module):  # the head's weight also feeds the body
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(3, 3), nn.Linear(3, 3)
        self.body.weight = self.head.weight

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("make", [_Scaled, _Tied])
def test_no_head_when_it_is_not_the_last_step_or_shares_weights(make):
    model = make()
    names = ("head.weight", "head.bias") if make is _Scaled else ("body.weight", "head.bias")  # named once when tied
    assert frozen_head(model, names, torch.randn(2, model.body.in_features)) is None


def test_head_found_for_last_layer_and_not_for_all_parameters():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    assert frozen_head(model, ParamSpace.select(model, "last_layer").names, torch.randn(2, 4)) == "2"
    assert frozen_head(model, ParamSpace.select(model, "all").names, torch.randn(2, 4)) is None


def test_features_are_the_head_input_of_every_row_in_row_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = _data((4,), n=10, classes=2)
    feats = head_features(model, "2", ListLoader(x, y, 3), 10, 4)
    assert feats is not None and feats.inputs.dtype == torch.float64
    torch.testing.assert_close(feats.inputs, torch.tanh(model[0](x)).double())
    assert torch.equal(feats.targets, y)
    assert torch.equal(torch.cat([b[0] for b in feats]), torch.arange(10))
    feats.batch_size = 4
    assert [len(b[0]) for b in feats] == [4, 4, 2]


def test_verify_retrains_the_head_on_features_with_the_full_network_answer(monkeypatch):
    from conftest import trained_case

    import influence_cli.head as head
    import influence_cli.retrain as retrain

    case = trained_case("mlp", n=40)
    case.problem.params = ParamSpace.select(case.problem.model, "last_layer")
    g = torch.Generator().manual_seed(7)
    test = ListLoader(torch.randn(25, case.x.shape[1], generator=g, dtype=torch.float64),
                      torch.randint(0, 3, (25,), generator=g), 10)
    config = TrainConfig(optimizer="lbfgs", epochs=2000, tol=1e-11)
    loss = retrain.mean_test_loss(case.problem.objective, test)
    calls = []
    real = retrain.head_features
    monkeypatch.setattr(retrain, "head_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = retrain.retrain_effects(case.problem, [0, 7, 19], loss, config)
    monkeypatch.setattr(head, "MEMORY_SHARE", 0.0)  # no room for the features: the whole network, as before
    slow = retrain.retrain_effects(case.problem, [0, 7, 19], loss, config)
    assert len(calls) == 2
    for a, b in zip(fast, slow, strict=True):
        assert abs(a.actual_loss_change) > 1e-6
        assert a.actual_loss_change == pytest.approx(b.actual_loss_change, rel=1e-6, abs=1e-12)
        assert a.grad_norm < 1e-8 and b.grad_norm < 1e-8
