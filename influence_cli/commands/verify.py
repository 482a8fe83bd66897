"""`infl verify`: how far the predicted loss changes can be trusted, measured by retraining.

Predict loss_change_if_removed on the mean loss of the selected test rows, retrain without a sample
of rows (half the largest |prediction|, half random; Koh & Liang) warm-started from the checkpoint
(retrain.py), and correlate predicted with actual changes (Pearson, Spearman, bootstrap 95%
intervals). With groups, also each group's first- and second-order prediction against removing the
group. The same predictions at 0.1x and 10x damping show whether an arbitrary constant drives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import distributed
from ..data import CastLoader, make_loader
from ..errors import ConfigError
from ..gradients import GradientSource
from ..groups import group_effects, mean_loss_change, mean_loss_hvp
from ..retrain import (
    RetrainResult,
    choose_rows,
    estimate_seconds,
    mean_test_loss,
    retrain_effects,
    retrain_groups,
    retrain_reference,
)
from ..run import Report, Run
from ..scores import loss_change_if_removed
from ..solvers.redamp import redamped
from ..stats import correlations, pearson
from .sweep import FACTORS, swept_damping


@dataclass(frozen=True)
class VerifyOptions:
    samples: int = 20
    test_ids: Sequence[str] | None = None
    groups: bool = False
    group_by: str | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or self.samples < 2:
            raise ConfigError(f"--samples: need at least 2 rows to correlate, got {self.samples}")
        if isinstance(self.workers, bool) or self.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {self.workers}")


def verify(run: Run, options: VerifyOptions = VerifyOptions()) -> Report:
    """Predicted vs actual (retrained) change of the mean test loss for `options.samples` training rows."""
    train = run.train
    test_rows = run.test_rows(options.test_ids)
    group_map = run.group_rows(options.group_by) if options.groups or options.group_by else None
    if (options.groups or options.group_by) and group_map is None:
        raise ConfigError("--groups: data.train.group is not set", hint="set it, or pass --group-by COLUMN")
    test_loader = run.stream(run.test, test_rows)  # type: ignore[arg-type]
    mean_grad = mean_test_gradient(run, test_loader, len(test_rows))
    predictions = _predictions(run, mean_grad)
    run.end_split()  # torchrun: the predictions were split over the ranks; rank 0 retrains alone
    predicted, mean_ihvp = predictions[run.damping]
    test_loss = mean_test_loss(run.problem.objective, test_loader)
    shuffled = shuffled_loader(run)
    with run.timer("retrain"):
        reference = retrain_reference(run.problem, test_loss, run.cfg.train, shuffled, test_ihvp_mean=mean_ihvp)
        rows = choose_rows(predicted, min(options.samples, train.n), np.random.default_rng(run.cfg.seed))
        eta = estimate_seconds(reference, len(rows), options.workers)
        results = retrain_effects(run.problem, rows, test_loss, run.cfg.train, run.phase("retrain"),
                                  workers=options.workers, shuffled=shuffled,
                                  reference=reference, test_ihvp_mean=mean_ihvp)
    actual = np.array([r.actual_loss_change for r in results])
    stats = correlations(predicted[rows], actual, np.random.default_rng(run.cfg.seed))
    by_damping = {_damping_name(run.damping, d): {"damping": d, "pearson": pearson(pred[rows], actual)}
                  for d, (pred, _) in predictions.items()}
    tables = {"verify.csv": pd.DataFrame({
        "train_id": np.asarray(train.ids, dtype=object)[rows], "predicted_loss_change": predicted[rows],
        "actual_loss_change": actual, "retrain_grad_norm": [r.grad_norm for r in results],
        "actual_error_estimate": [r.actual_error for r in results]})}
    summary: dict[str, Any] = {"command": "verify", "n": train.n, "samples": len(rows),
                               "test_examples": len(test_rows), "solver": run.cfg.solver.name, **stats,
                               "pearson_by_damping": by_damping, "estimated_seconds": eta,
                               "reference_grad_norm": reference.grad_norm}
    if summary.get("pearson_ci95") and not all(np.isfinite(summary["pearson_ci95"])):
        run.warnings.append(f"no 95% interval for the correlations: {len(rows)} rows are too few to bootstrap"
                            " (use --samples 10 or more)")
    if group_map is not None:
        with run.timer("groups"):
            tables["groups_verify.csv"], summary["groups"] = _groups(run, group_map, mean_ihvp, test_loader,
                                                                     len(test_rows), test_loss, shuffled, reference)
    summary["max_retrain_error_estimate"] = _warn_unconverged(run, results, reference, actual)
    return run.finish(summary, tables)


def mean_test_gradient(run: Run, loader: Any, count: int) -> Tensor:
    with run.timer("test_gradients"):
        mean_grad = torch.zeros(run.problem.params.size, dtype=torch.float64, device=run.device)
        for b in GradientSource(run.problem).per_example(loader, run.test.ids):  # type: ignore[union-attr]
            mean_grad += b.grads.double().sum(0)  # summed as it streams: never (T, p) at once
    return mean_grad / count


def _predictions(run: Run, mean_grad: Tensor) -> dict[float, tuple[np.ndarray, Tensor]]:
    """damping -> (predicted change of the mean test loss per training row (n,), H^-1 gbar (p,)), at
    the run's damping and at 0.1x and 10x; the run is left at its own damping and solver."""
    base, predictions = run.damping, {}
    base_solver = run.fit()
    for damping in (base, *(swept_damping(base, f) for f in FACTORS)):
        if damping != base:
            run.at_damping(damping, redamped(base_solver, damping, run.problem))
        solver = run.fit()
        with run.timer("predict"):
            mean_ihvp = solver.ihvp(mean_grad[None])
            predicted = torch.zeros(run.train.n, dtype=torch.float64)
            rows, split = distributed.part(run.problem.train_loader)  # torchrun: this rank's rows
            for b in GradientSource(run.problem).per_example(rows, run.train.ids):
                predicted[b.idx] = loss_change_if_removed(mean_ihvp, b.grads, run.train.n)[0].cpu().double()
            if split:  # each row is nonzero on one rank only: the sum is exact
                distributed.all_sum(predicted)
        predictions[damping] = (predicted.numpy(), mean_ihvp[0])
    run.at_damping(base, base_solver)
    return predictions


def _damping_name(base: float, damping: float) -> str:
    for factor in FACTORS:
        if damping == swept_damping(base, factor) and damping != base:
            return f"x{factor:g}"
    return "x1"


def shuffled_loader(run: Run) -> Any:
    """A freshly seeded minibatch loader for adam/sgd retrains (the same order for every retrain)."""
    if run.cfg.train.optimizer == "lbfgs":
        return None

    def shuffled() -> Any:
        generator = torch.Generator().manual_seed(run.cfg.seed)
        return CastLoader(make_loader(run.train, run.cfg.batch_size, shuffle=True, generator=generator), run.dtype)

    return shuffled


def retrain_threads(run: Run) -> int | None:
    """The torch threads retraining should run with: one for small models, whose OpenMP threads spin
    against each other on shared cores (measured in retrain.retrain_effects); verify's CLI command and rank's group
    retrains (rank_groups.py) apply it with retrain.torch_threads."""
    return 1 if run.problem.params.size < 100_000 else None


def _groups(run: Run, group_map: dict[str, np.ndarray], mean_ihvp: Tensor, test_loader: Any, t_count: int,
            test_loss: Any, shuffled: Any, reference: RetrainResult) -> tuple[pd.DataFrame, dict[str, Any]]:
    source = GradientSource(run.problem)
    frame = group_effects(run.problem, run.fitted(), mean_ihvp, group_map,
                          lambda: source.per_example(run.problem.train_loader, run.train.ids),
                          test_hvp=mean_loss_hvp(run.problem, test_loader, t_count),
                          test_loss_change=mean_loss_change(run.problem, test_loader, t_count))
    removed = retrain_groups(run.problem, [group_map[g] for g in frame["group"]], test_loss, run.cfg.train,
                             shuffled=shuffled, reference=reference)
    frame["actual_loss_change"] = [r.actual_loss_change for r in removed]
    fits = {order: _group_fit(frame[column], frame["actual_loss_change"])
            for order, column in (("newton", "loss_change_if_removed"), ("first_order", "loss_change_if_removed_1st"),
                                  ("second_order", "loss_change_if_removed_2nd"))}
    return frame, fits


def _group_fit(predicted: pd.Series, actual: pd.Series) -> dict[str, float]:
    pred, act = predicted.to_numpy(dtype=float), actual.to_numpy(dtype=float)
    return {"pearson": pearson(pred, act), "mean_abs_error": float(np.mean(np.abs(pred - act))),
            "magnitude_ratio": float(np.abs(pred).sum() / max(np.abs(act).sum(), 1e-300))}


def _warn_unconverged(run: Run, results: list[RetrainResult], reference: RetrainResult,
                      actual: np.ndarray) -> float | None:
    """A warning when retrains stopped short and their error is not small; returns the largest error estimate."""
    unconverged = sum(not r.converged for r in results)
    errors = np.abs([r.actual_error for r in results], dtype=float)
    resolved = bool(np.all(np.isfinite(errors))) and errors.max(initial=0.0) <= 0.1 * np.median(np.abs(actual))
    if (unconverged or not reference.converged) and not resolved:
        run.warnings.append(
            f"{unconverged} of {len(results)} retrains (and the reference: "
            f"{'converged' if reference.converged else 'not converged'}) stopped above train.tol={run.cfg.train.tol:g}"
            " and their estimated error is not small against the measured changes; raise train.epochs or lower"
            " train.tol")
    return float(errors.max(initial=0.0)) if np.all(np.isfinite(errors)) else None
