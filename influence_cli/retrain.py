"""`infl verify`: retrain without a few training rows (or groups) and compare with the prediction.

Method (Koh & Liang 2017, section 5.1): choose rows (half the largest |predicted effect|, half at
random among the rest), retrain without each one with the `train:` recipe, warm-started from the
checkpoint, and measure the actual change of the mean loss over the selected test rows. Removing a
row sets its weight to 0 while n stays fixed (train.py), exactly the perturbation influence
linearizes.

Only the selected parameters (problem.params) are retrained; the others stay at the checkpoint.
Influence treats them as fixed (H and the gradients are over the selected parameters only), so this
is the retraining it predicts: with `params: last_layer` a full retrain would measure something else.

Every retrain starts from the checkpoint's parameters, restored between retrains. A reference
retrain with nothing removed runs first from the same start; each actual change is measured
against it, not against the checkpoint, so that any remaining drift of the recipe (a checkpoint
not exactly at the recipe's optimum, an optimizer that stops early) cancels instead of being
attributed to the removed row. The gradient norm each retrain reached is reported, and, given
a = H^-1 gbar, the first-order error of each actual change from stopping short of the optimum
(RetrainResult.actual_error): an actual change is trustworthy only when that error is small
against it.

L-BFGS retrains in float64 (as `infl train` does), on a private copy of the model; when the selected
parameters are a head on a frozen body (`params: last_layer`, head.py), its features are computed once and
every retrain optimizes the head on them, as `infl train`'s polish does. Cost: 1 + count
retrains, each about as long as the reference (time it, then `estimate_seconds`). Retrains run in
`workers` forked processes on Linux CPUs (fork shares the model and data without pickling); see
`retrain_effects` for the measured trade-off.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import TrainConfig
from .data import CastLoader
from .errors import ConfigError
from .head import frozen_head, head_features
from .objective import Objective, Problem
from .train import minimize

Progress = Callable[[int, int], None]
Loader = Iterable[tuple[Tensor, Tensor, Tensor]]
TestLossFn = Callable[[nn.Module], float]


@dataclass(frozen=True)
class RetrainResult:
    """One retrain without `rows` (empty for the reference). actual_loss_change = test_loss -
    reference_test_loss; grad_norm is the full objective's gradient norm reached (train.py).

    With test_ihvp_mean (a = H^-1 gbar) given: residual_effect = a^T r for the residual gradient r
    the retrain stopped at, its test loss's first-order offset from the exact optimum (theta is
    off by about H^-1 r); actual_error = residual_effect - the reference's, the estimated error
    of actual_loss_change from stopping early. |actual_error| << |actual_loss_change| means the
    retrain resolved the change. NaN without test_ihvp_mean."""

    rows: np.ndarray
    test_loss: float
    reference_test_loss: float
    actual_loss_change: float
    grad_norm: float
    iterations: int
    converged: bool
    seconds: float
    residual_effect: float = math.nan
    actual_error: float = math.nan


def choose_rows(predicted: np.ndarray, samples: int, generator: np.random.Generator) -> np.ndarray:
    """Rows to retrain without: ceil(samples/2) with the largest |predicted| (ties by row order),
    then the rest drawn without replacement among the others. (n,) -> (min(samples, n),) int64."""
    predicted = np.asarray(predicted, dtype=np.float64)
    n = len(predicted)
    if samples < 1:
        raise ConfigError(f"--samples: must be >= 1, got {samples}")
    samples = min(samples, n)
    order = np.lexsort((np.arange(n), -np.abs(predicted)))
    top = order[: math.ceil(samples / 2)]
    rest = order[len(top):]
    drawn = generator.choice(rest, size=samples - len(top), replace=False) if samples > len(top) else rest[:0]
    return np.concatenate([top, drawn]).astype(np.int64)


def mean_test_loss(objective: Objective, loader: Loader) -> TestLossFn:
    """model -> mean per-example loss over `loader`'s rows (inputs cast to the model's dtype)."""

    def loss_of(model: nn.Module) -> float:
        param = next(model.parameters())
        total, count = 0.0, 0
        with torch.no_grad():
            for _, x, y in loader:
                x = x.to(device=param.device, dtype=param.dtype if x.is_floating_point() else x.dtype)
                total += float(objective.per_example_loss(model(x), y.to(param.device)).double().sum())
                count += len(x)
        return total / max(count, 1)

    return loss_of


def retrain_effects(problem: Problem, rows: Sequence[int] | np.ndarray, test_loss_fn: TestLossFn, config: TrainConfig,
                    progress: Progress | None = None, *, workers: int = 1,
                    shuffled: Callable[[], Loader] | None = None, reference: RetrainResult | None = None,
                    test_ihvp_mean: Tensor | None = None) -> list[RetrainResult]:
    """Leave-one-out retraining for each of `rows`; see the module docstring. Returns one result per
    row, in order. `reference` (from `retrain_reference`, with the same test_ihvp_mean) is computed
    here when not given. test_ihvp_mean (p,) enables the error estimate (RetrainResult; one extra
    gradient pass per retrain).
    `shuffled()` returns a freshly seeded minibatch loader for adam/sgd (the same order for every
    retrain). progress(done, total) counts retrains.

    workers > 1 forks that many processes with one torch thread each (Linux, CPU only; else serial);
    the caller sets torch's intra-op threads for a serial run (the CLI: 1 below 100k parameters). Measured on a
    shared 2-core machine under load (digits logistic regression, 650 parameters, 8 L-BFGS
    retrains): 1 process x 1 thread 30 s, 2 processes x 1 thread 36 s, 1 process x 2 threads 489 s
    (OpenMP threads spin against other work on oversubscribed cores). Hence small models should
    retrain with one thread, and workers > 1 pays only where cores are idle."""
    return _run(problem, [np.asarray([r], dtype=np.int64) for r in rows], test_loss_fn, config, progress,
                workers, shuffled, reference, test_ihvp_mean)


def retrain_groups(problem: Problem, groups: Sequence[np.ndarray], test_loss_fn: TestLossFn, config: TrainConfig,
                   progress: Progress | None = None, *, workers: int = 1,
                   shuffled: Callable[[], Loader] | None = None, reference: RetrainResult | None = None,
                   test_ihvp_mean: Tensor | None = None,
                   go_on: Callable[[list[RetrainResult]], bool] | None = None) -> list[RetrainResult]:
    """As retrain_effects, removing each group of rows (int arrays) at once. With `go_on(done)` the
    groups are retrained one after another (serially) while it returns True: the results so far, in order."""
    return _run(problem, [np.asarray(g, dtype=np.int64) for g in groups], test_loss_fn, config, progress,
                workers, shuffled, reference, test_ihvp_mean, go_on)


def retrain_reference(problem: Problem, test_loss_fn: TestLossFn, config: TrainConfig,
                      shuffled: Callable[[], Loader] | None = None,
                      test_ihvp_mean: Tensor | None = None) -> RetrainResult:
    """The recipe run from the checkpoint with nothing removed; its test loss is the reference."""
    return _Retrainer(problem, test_loss_fn, config, shuffled, test_ihvp_mean).reference()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads for the retrains within (None: as they are), restored after: the caller decides
    (verify's CLI command, rank's group retrains: `commands.verify.retrain_threads`), see retrain_effects."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def estimate_seconds(reference: RetrainResult, count: int, workers: int = 1) -> float:
    """Wall time of `count` more retrains at the reference retrain's pace: a lower bound, since the
    reference starts at its optimum (measured: digits logistic regression, reference 2.1 s, each
    leave-one-out retrain 3.8 s); a progress bar's remaining-time column refines it as they run."""
    return reference.seconds * math.ceil(count / max(workers, 1))


# ---- internals ----------------------------------------------------------------------------------
class _Retrainer:
    """A private copy of the model whose selected parameters are retrained from the checkpoint."""

    def __init__(self, problem: Problem, test_loss_fn: TestLossFn, config: TrainConfig,
                 shuffled: Callable[[], Loader] | None, test_ihvp_mean: Tensor | None = None) -> None:
        self.problem, self.test_loss_fn, self.config, self.shuffled = problem, test_loss_fn, config, shuffled
        self.a = None if test_ihvp_mean is None else test_ihvp_mean.reshape(-1).to(torch.float64)
        model = copy.deepcopy(problem.model)
        dtype = torch.float64 if config.optimizer == "lbfgs" else next(problem.model.parameters()).dtype
        self.model = model.to(dtype)
        named = dict(self.model.named_parameters())
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = [named[name] for name in problem.params.names]
        self.start = [p.detach().clone() for p in self.params]
        self.loader = CastLoader(problem.train_loader, dtype)
        self.dtype = dtype
        self.net: nn.Module = self.model  # what minimize runs: the model, or its head on the frozen features
        self.rows: Loader = self.loader
        if config.optimizer == "lbfgs":
            self._use_head_features()

    def _use_head_features(self) -> None:
        """With a head on a frozen body (head.py, `params: last_layer`): its features once, from the
        checkpoint's model in its own dtype, and every retrain on them (same objective, a layer's cost)."""
        problem = self.problem
        sample = next(iter(problem.train_loader))[1][:2]
        head = frozen_head(problem.model, problem.params.names, sample)
        features = None if head is None else head_features(problem.model, head, problem.train_loader, problem.n, 256)
        if features is not None:
            self.net, self.rows = dict(self.model.named_modules())[head], features

    def residual_effect(self, exclude: Tensor | None) -> float:
        """a^T r, r = gradient of the (row-weighted) objective at the current parameters."""
        if self.a is None:
            return math.nan
        obj, n, device = self.problem.objective, self.problem.n, self.params[0].device
        weights = torch.ones(n) if exclude is None else (~exclude).double()
        grads = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        for idx, x, y in self.rows:
            losses = obj.per_example_loss(self.net(x.to(device)), y.to(device))
            loss = (losses * weights[idx].to(device=device, dtype=losses.dtype)).sum() / n
            for g, d in zip(grads, torch.autograd.grad(loss, self.params), strict=True):
                g += d.double()
        flat = torch.cat([(g + obj.weight_decay * p.detach().double()).reshape(-1)
                          for g, p in zip(grads, self.params, strict=True)])
        return float(flat @ self.a.to(flat.device))

    def retrain(self, rows: np.ndarray) -> tuple[float, Any, float, float]:
        start = time.perf_counter()
        with torch.no_grad():
            for p, s in zip(self.params, self.start, strict=True):
                p.copy_(s)
                p.requires_grad_(True)
        exclude = torch.zeros(self.problem.n, dtype=torch.bool)
        exclude[torch.as_tensor(rows, dtype=torch.long)] = True
        shuffled = CastLoader(self.shuffled(), self.dtype) if self.shuffled is not None else None
        device = self.params[0].device
        try:  # every retrain draws the same random numbers (dropout), without touching the caller's RNG
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.problem.seed)
                result = minimize(self.net, self.params, self.problem.objective, self.rows, self.problem.n,
                                  self.config, exclude=exclude if len(rows) else None, shuffled=shuffled)
            self.model.eval()
            residual = self.residual_effect(exclude if len(rows) else None)
        finally:
            for p in self.params:
                p.requires_grad_(False)
        return self.test_loss_fn(self.model), result, time.perf_counter() - start, residual

    def reference(self) -> RetrainResult:
        loss, res, seconds, residual = self.retrain(np.zeros(0, dtype=np.int64))
        return RetrainResult(np.zeros(0, dtype=np.int64), loss, loss, 0.0, res.grad_norm, res.iterations,
                             res.converged, seconds, residual, 0.0 if math.isfinite(residual) else math.nan)

    def result(self, rows: np.ndarray, ref: RetrainResult) -> RetrainResult:
        loss, res, seconds, residual = self.retrain(rows)
        return RetrainResult(rows, loss, ref.test_loss, loss - ref.test_loss, res.grad_norm, res.iterations,
                             res.converged, seconds, residual, residual - ref.residual_effect)


_FORKED: dict[str, Any] = {}  # the parent's retrainer, inherited by forked workers


def _forked_result(job: tuple[np.ndarray, RetrainResult]) -> RetrainResult:
    torch.set_num_threads(1)
    return _FORKED["worker"].result(*job)


def _run(problem: Problem, sets: list[np.ndarray], test_loss_fn: TestLossFn, config: TrainConfig,
         progress: Progress | None, workers: int, shuffled: Callable[[], Loader] | None,
         reference: RetrainResult | None, test_ihvp_mean: Tensor | None,
         go_on: Callable[[list[RetrainResult]], bool] | None = None) -> list[RetrainResult]:
    for rows in sets:
        if len(rows) and (rows.min() < 0 or rows.max() >= problem.n):
            raise ConfigError(f"verify: row index out of range 0..{problem.n - 1}")
    worker = _Retrainer(problem, test_loss_fn, config, shuffled, test_ihvp_mean)
    ref = reference if reference is not None else worker.reference()
    if progress is not None:
        progress(0, len(sets))
    parallel = (workers > 1 and len(sets) > 1 and sys.platform.startswith("linux")
                and problem.device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods())
    if go_on is not None:
        done: list[RetrainResult] = []
        while len(done) < len(sets) and go_on(done):
            done.append(_report(worker.result(sets[len(done)], ref), len(done), len(sets), progress))
        return done
    if not parallel:
        return [_report(worker.result(rows, ref), i, len(sets), progress) for i, rows in enumerate(sets)]
    _FORKED["worker"] = worker
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(sets))) as pool:
            jobs = pool.imap(_forked_result, [(rows, ref) for rows in sets])
            return [_report(res, i, len(sets), progress) for i, res in enumerate(jobs)]
    finally:
        _FORKED.clear()


def _report(result: RetrainResult, i: int, total: int, progress: Progress | None) -> RetrainResult:
    if progress is not None:
        progress(i + 1, total)
    return result
