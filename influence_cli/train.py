"""Minimizing the training objective: `infl train`, and (leave-one-out) retraining.

The objective is SPEC's: (1/n) sum_i w_i L(z_i) + 0.5 * weight_decay * ||theta||^2 with w_i = 1, or
w_i = 0 for removed rows while n stays the original n. Keeping n fixed is exactly the perturbation
the influence function linearizes (upweighting z by -1/n), so retraining measures what influence
predicts; dividing by n - 1 instead would add the same constant shift to every row's change.

L-BFGS (default) is full-batch with a strong-Wolfe line search and evaluates the model in eval
mode, so the result is a true stationary point of the objective influence differentiates.
Adam/SGD run shuffled minibatch epochs in train mode (dropout/batch norm as usual).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .errors import DataError
from .objective import Objective

Progress = Callable[[int, int], None]
Loader = Iterable[tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class TrainResult:
    objective: float
    grad_norm: float  # 2-norm of the full objective's gradient over the trained parameters
    iterations: int
    converged: bool


def minimize(model: nn.Module, params: Sequence[nn.Parameter], objective: Objective, loader: Loader, n: int,
             config: TrainConfig, *, exclude: Tensor | None = None, shuffled: Loader | None = None,
             progress: Progress | None = None) -> TrainResult:
    """Minimize the objective over `params` in place. `exclude` (n,) bool marks removed rows.
    `shuffled` is the minibatch loader for adam/sgd (defaults to `loader`)."""
    device = params[0].device
    weights = torch.ones(n, device=device) if exclude is None else (~exclude.to(device)).to(params[0].dtype)

    def full_objective() -> float:
        """Accumulate the full objective's gradient into .grad; return its value."""
        for p in params:
            p.grad = None
        total = 0.0
        for idx, x, y in loader:
            idx = idx.to(device)
            losses = objective.per_example_loss(model(x.to(device)), y.to(device))
            loss = (losses * weights[idx].to(losses.dtype)).sum() / n
            loss.backward()
            total += float(loss.detach())
        reg = sum(0.5 * objective.weight_decay * p.square().sum() for p in params)
        reg.backward()
        value = total + float(reg.detach())
        if not math.isfinite(value):
            raise DataError("training diverged: the objective became NaN/inf",
                            hint="lower train.lr, or check the data for extreme values")
        return value

    if config.optimizer == "lbfgs":
        model.eval()
        optimizer = torch.optim.LBFGS(params, lr=config.lr, max_iter=config.epochs, tolerance_grad=config.tol / 10,
                                      tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe")
        calls = [0]

        def closure() -> float:
            value = full_objective()
            calls[0] += 1
            if progress is not None:
                progress(min(calls[0], config.epochs), config.epochs)
            return value

        optimizer.step(closure)
        iterations = int(optimizer.state[optimizer._params[0]].get("n_iter", calls[0]))
    else:
        optimizer = (torch.optim.Adam(params, lr=config.lr) if config.optimizer == "adam"
                     else torch.optim.SGD(params, lr=config.lr, momentum=config.momentum))
        model.train()
        batches = shuffled if shuffled is not None else loader
        for epoch in range(config.epochs):
            for idx, x, y in batches:
                optimizer.zero_grad()
                idx = idx.to(device)
                losses = objective.per_example_loss(model(x.to(device)), y.to(device))
                w = weights[idx].to(losses.dtype)
                loss = (losses * w).sum() / max(float(w.sum()), 1.0)
                loss = loss + sum(0.5 * objective.weight_decay * p.square().sum() for p in params)
                if not torch.isfinite(loss):
                    raise DataError("training diverged: the loss became NaN/inf", hint="lower train.lr")
                loss.backward()
                optimizer.step()
            if progress is not None:
                progress(epoch + 1, config.epochs)
        iterations = config.epochs
        model.eval()
    value = full_objective()
    grad_norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    for p in params:
        p.grad = None
    return TrainResult(objective=value, grad_norm=grad_norm, iterations=iterations, converged=grad_norm <= config.tol)
