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
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .config import Config, TrainConfig
from .data import CastLoader, Split, make_loader
from .errors import DataError
from .head import frozen_head, head_features
from .objective import Objective, Problem

Progress = Callable[..., None]  # progress(done, total, unit=..., loss=...)
ProgressFn = Callable[..., None]  # progress(phase, done, total, **info), the CLI's
Loader = Iterable[tuple[Tensor, Tensor, Tensor]]
POLISH_ITERATIONS = 200


@dataclass(frozen=True)
class TrainResult:
    objective: float
    grad_norm: float  # 2-norm of the full objective's gradient over the trained parameters
    iterations: int
    converged: bool
    accuracy: float | None = None  # training rows predicted as labelled (classification/binary), at the end
    head_only: bool = False  # trained on the frozen body's features (head.py)


def minimize(model: nn.Module, params: Sequence[nn.Parameter], objective: Objective, loader: Loader, n: int,
             config: TrainConfig, *, exclude: Tensor | None = None, shuffled: Loader | None = None,
             progress: Progress | None = None) -> TrainResult:
    """Minimize the objective over `params` in place. `exclude` (n,) bool marks removed rows.
    `shuffled` is the minibatch loader for adam/sgd (defaults to `loader`). `model` may be a head
    and `loader` its features (head.py): the objective is the same. progress(done, total, unit=, loss=)
    counts L-BFGS evaluations or epochs, with the objective (L-BFGS) or the epoch's mean loss."""
    device = params[0].device
    weights = torch.ones(n, device=device) if exclude is None else (~exclude.to(device)).to(params[0].dtype)
    correct = [0, 0]  # rows predicted as labelled, rows counted: in the last full evaluation

    def full_objective(count: bool = False) -> float:
        """Accumulate the full objective's gradient into .grad; return its value. `count`: also count the
        rows predicted as labelled (the last evaluation only: it costs a softmax per row)."""
        for p in params:
            p.grad = None
        total = 0.0
        correct[:] = [0, 0]
        for idx, x, y in loader:
            idx, y = idx.to(device), y.to(device)
            out = model(x.to(device))
            losses = objective.per_example_loss(out, y)
            loss = (losses * weights[idx].to(losses.dtype)).sum() / n
            loss.backward()
            total += float(loss.detach())
            if count and objective.task != "regression":
                with torch.no_grad():
                    hit = objective.predict(out, y)[0].reshape(-1) == y.reshape(-1).long()
                correct[0] += int(hit.sum())
                correct[1] += len(hit)
        reg = sum(0.5 * objective.weight_decay * p.square().sum() for p in params)
        reg.backward()
        value = total + float(reg.detach())
        if not math.isfinite(value):
            raise DataError("training diverged: the objective became NaN/inf",
                            hint="lower train.lr, or check the data for extreme values")
        return value

    if config.optimizer == "lbfgs":
        model.eval()
        max_eval = config.epochs * 5 // 4  # torch's default
        optimizer = torch.optim.LBFGS(params, lr=config.lr, max_iter=config.epochs, max_eval=max_eval,
                                      tolerance_grad=config.tol / 10, tolerance_change=0.0, history_size=50,
                                      line_search_fn="strong_wolfe")
        calls = [0]

        def closure() -> float:
            value = full_objective()
            calls[0] += 1
            if progress is not None:
                progress(min(calls[0], max_eval), max_eval, unit="evaluations", loss=value)
            return value

        optimizer.step(closure)
        iterations = int(optimizer.state[optimizer._params[0]].get("n_iter", calls[0]))
    else:
        optimizer = (torch.optim.Adam(params, lr=config.lr) if config.optimizer == "adam"
                     else torch.optim.SGD(params, lr=config.lr, momentum=config.momentum))
        model.train()
        batches = shuffled if shuffled is not None else loader
        for epoch in range(config.epochs):
            seen, summed = 0, 0.0
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
                seen, summed = seen + len(idx), summed + float(loss.detach()) * len(idx)
            if progress is not None:
                progress(epoch + 1, config.epochs, unit="epochs", loss=summed / max(seen, 1))
        iterations = config.epochs
        model.eval()
    value = full_objective(count=True)
    grad_norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    for p in params:
        p.grad = None
    accuracy = correct[0] / correct[1] if correct[1] else None
    return TrainResult(objective=value, grad_norm=grad_norm, iterations=iterations, converged=grad_norm <= config.tol,
                       accuracy=accuracy)


def fit(model: nn.Module, problem: Problem, split: Split, cfg: Config,
        progress: ProgressFn | None = None) -> tuple[TrainResult, TrainResult | None]:
    """`infl train`'s recipe on `model` (in place): every parameter with cfg.train (L-BFGS full-batch in
    float64; adam/sgd in the model's dtype on seeded shuffled batches), then, after adam/sgd with
    train.polish, the selected parameters (problem.params) by `polish`. Returns (training, polish or None);
    the model ends in the dtype it started in."""
    dtype = next(model.parameters()).dtype
    for p in model.parameters():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(cfg.seed)
    shuffled = CastLoader(make_loader(split, cfg.batch_size, shuffle=True, generator=generator), dtype)
    work = torch.float64 if cfg.train.optimizer == "lbfgs" else dtype
    model.to(work)
    result = minimize(model, list(model.parameters()), problem.objective,
                      CastLoader(make_loader(split, cfg.batch_size), work), problem.n, cfg.train,
                      shuffled=shuffled, progress=_phase(progress, "train"))
    model.to(dtype)
    polished = None
    if cfg.train.optimizer != "lbfgs" and cfg.train.polish:
        polished = polish(model, problem.params.names, problem.objective, make_loader(split, cfg.batch_size),
                          problem.n, replace(cfg.train, optimizer="lbfgs", lr=1.0, epochs=POLISH_ITERATIONS),
                          cfg.batch_size, progress)
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return result, polished


def polish(model: nn.Module, names: Sequence[str], objective: Objective, loader: Loader, n: int,
           config: TrainConfig, batch_size: int, progress: ProgressFn | None = None) -> TrainResult:
    """L-BFGS in float64 on the parameters `names` of `model`, the others fixed (config: an lbfgs recipe).
    When they are a head on a frozen body (head.py) its features are computed once, in the model's dtype,
    and the head alone is optimized on them (phases "features", rows, and "polish", evaluations); else
    the whole network runs in float64 on every evaluation. The head, or the model, is left in float64."""
    head = None
    for _, x, _ in loader:
        head = frozen_head(model, names, x[:2])
        break
    features = None if head is None else head_features(model, head, loader, n, batch_size,
                                                       _phase(progress, "features"))
    chosen = set(names)
    frozen = [p for k, p in model.named_parameters() if k not in chosen and p.requires_grad]
    for p in frozen:  # no gradient through the body
        p.requires_grad_(False)
    try:
        if features is None:
            model.to(torch.float64)
            named = dict(model.named_parameters())
            return minimize(model, [named[k] for k in names], objective, CastLoader(loader, torch.float64), n,
                            config, progress=_phase(progress, "polish"))
        layer = dict(model.named_modules())[head].to(torch.float64)  # type: ignore[index]
        named = dict(model.named_parameters())
        result = minimize(layer, [named[k] for k in names], objective, features, n, config,
                          progress=_phase(progress, "polish"))
        return replace(result, head_only=True)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _phase(progress: ProgressFn | None, name: str) -> Progress | None:
    """One phase's callback of the CLI's progress(phase, done, total, **info)."""
    if progress is None:
        return None
    return lambda done, total, **info: progress(name, done, total, **info)
