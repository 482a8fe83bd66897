"""The advice when `infl train` stops above train.tol follows what the run saw."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from influence_cli.commands.train import not_converged_advice


def cfg(optimizer="lbfgs", epochs=200, params="all"):
    return SimpleNamespace(train=SimpleNamespace(optimizer=optimizer, epochs=epochs, tol=1e-5), params=params)


def test_a_stalled_lbfgs_on_relu_is_told_to_use_tanh_not_more_epochs():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    text = not_converged_advice(cfg(), model, SimpleNamespace(grad_norm=0.028, iterations=57), False)
    assert "tanh" in text and "more epochs will not help" in text and "raise train.epochs" not in text


def test_an_lbfgs_out_of_budget_is_told_to_raise_epochs():
    model = torch.nn.Linear(3, 2)
    text = not_converged_advice(cfg(), model, SimpleNamespace(grad_norm=1e-3, iterations=200), False)
    assert "raise train.epochs" in text and "tanh" not in text


def test_adam_without_polish_is_told_to_polish():
    text = not_converged_advice(cfg("adam"), torch.nn.Linear(3, 2), SimpleNamespace(grad_norm=0.1, iterations=15),
                                False)
    assert "train.polish" in text
