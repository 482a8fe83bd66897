"""Measuring how far the numbers can be trusted: `infl verify` and the damping sweep.

verify: predict loss_change_if_removed on the mean loss of the selected test rows, retrain without a
sample of rows (half the largest |prediction|, half random; Koh & Liang) warm-started from the
checkpoint, and correlate predicted with actual changes (Pearson, Spearman, bootstrap 95%
intervals). With groups, also each group's first- and second-order prediction against removing the
group. The same predictions at 0.1x and 10x damping show whether an arbitrary constant drives them.

damping_sweep: rerun selfcheck or rank at 0.1x and 10x `solver.damping` (1e-4 and 1e-2 when it is 0)
and report how much the ranking moves (Spearman over all rows and over the top 10%, top-10% overlap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import pipeline, ranking
from .config import Config
from .data import CastLoader
from .errors import ConfigError
from .gradients import GradientSource
from .groups import group_effects, mean_loss_hvp
from .scores import loss_change_if_removed
from .solvers import make_solver
from .verify import (
    choose_rows,
    correlations,
    estimate_seconds,
    mean_test_loss,
    retrain_effects,
    retrain_groups,
    retrain_reference,
)

FACTORS = (0.1, 10.0)


def damped(cfg: Config, factor: float) -> Config:
    base = cfg.solver.damping
    value = base * factor if base > 0 else (1e-4 if factor < 1 else 1e-2)
    return replace(cfg, solver=replace(cfg.solver, damping=value))


def damping_sweep(cfg: Config, command: str, base: pipeline.Report, progress: pipeline.ProgressFn | None = None,
                  test_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Agreement of the ranking at 0.1x and 10x damping with `base` (same command, same inputs)."""
    table, column = (("selfcheck.csv", "self_influence") if command == "selfcheck"
                     else ("overall.csv", "loss_change_if_removed"))
    reference = base.tables[table].set_index("id")[column]
    out: dict[str, Any] = {"damping": cfg.solver.damping, "column": column}
    for factor in FACTORS:
        alt_cfg = damped(cfg, factor)
        alt = (pipeline.selfcheck(alt_cfg, progress) if command == "selfcheck"
               else ranking.rank(alt_cfg, progress, test_ids=test_ids))
        values = alt.tables[table].set_index("id")[column].loc[reference.index]
        out[f"x{factor:g}"] = {"damping": alt_cfg.solver.damping, **_agreement(reference, values, command)}
    return out


def attach_sweep(result: pipeline.Report, sweep: dict[str, Any]) -> None:
    result.summary["damping_sweep"] = sweep
    result.manifest["summary"]["damping_sweep"] = sweep
    for factor in FACTORS:
        figure = sweep[f"x{factor:g}"]["spearman_top"]
        if figure < 0.8:
            result.warnings.append(f"the top of the ranking depends on solver.damping: Spearman {figure:.2f} with the"
                                   f" ranking at {factor:g}x damping; check `infl verify` before acting on it")


def verify(cfg: Config, progress: pipeline.ProgressFn | None = None, samples: int = 20,
           test_ids: Sequence[str] | None = None, groups: bool = False, group_by: str | None = None,
           workers: int = 1) -> pipeline.Report:
    """Predicted vs actual (retrained) change of the mean test loss for `samples` training rows."""
    if samples < 2:
        raise ConfigError(f"--samples: need at least 2 rows to correlate, got {samples}")
    timer = pipeline.Timer()
    with timer("load"):
        inp = pipeline.load_inputs(cfg, need_test=True)
    problem, train, test = inp.problem, inp.train, pipeline.require_test(inp.test)
    rows_t = ranking._select_test_rows(test, test_ids)
    group_map = ranking.group_rows(train, group_by) if groups or group_by else None
    if (groups or group_by) and group_map is None:
        raise ConfigError("--groups: data.train.group is not set", hint="set it, or pass --group-by COLUMN")
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    test_loader = CastLoader(pipeline._only_rows(pipeline.make_loader(test, cfg.batch_size), rows_t, test.n),
                                 dtype)
    source = GradientSource(problem)
    with timer("test_gradients"):
        mean_grad = torch.zeros(problem.params.size, dtype=torch.float64, device=inp.device)
        for b in source.per_example(test_loader, test.ids):  # summed as it streams: never (T, p) at once
            mean_grad += b.grads.double().sum(0)
        mean_grad /= len(rows_t)
    predictions, solvers = {}, {}
    for name, run_cfg in [("x1", cfg)] + [(f"x{f:g}", damped(cfg, f)) for f in FACTORS]:
        with timer("fit"):
            solver = make_solver(run_cfg.solver, problem)
            solver.fit(replace(problem, damping=run_cfg.solver.damping), pipeline._phase(progress, "fit"))
        with timer("predict"):
            mean_ihvp = solver.ihvp(mean_grad[None])
            predicted = np.zeros(train.n)
            for b in source.per_example(problem.train_loader, train.ids):
                predicted[b.idx.numpy()] = loss_change_if_removed(mean_ihvp, b.grads, train.n)[0].cpu().numpy()
        predictions[name], solvers[name] = (predicted, mean_ihvp[0]), solver
    predicted, mean_ihvp = predictions["x1"]
    test_loss = mean_test_loss(problem.objective, test_loader)
    shuffled = None
    if cfg.train.optimizer != "lbfgs":
        def shuffled() -> Any:
            generator = torch.Generator().manual_seed(cfg.seed)
            return CastLoader(pipeline.make_loader(train, cfg.batch_size, shuffle=True, generator=generator), dtype)
    threads = 1 if problem.params.size < 100_000 else None
    with timer("retrain"):
        reference = retrain_reference(problem, test_loss, cfg.train, shuffled, test_ihvp_mean=mean_ihvp)
        rows = choose_rows(predicted, min(samples, train.n), np.random.default_rng(cfg.seed))
        eta = estimate_seconds(reference, len(rows), workers)
        if progress is not None:
            progress("retrain", 0, len(rows))
        results = retrain_effects(problem, rows, test_loss, cfg.train, pipeline._phase(progress, "retrain"),
                                  workers=workers, threads=threads, shuffled=shuffled, reference=reference,
                                  test_ihvp_mean=mean_ihvp)
    actual = np.array([r.actual_loss_change for r in results])
    stats = correlations(predicted[rows], actual, np.random.default_rng(cfg.seed))
    by_damping = {name: {"damping": damped(cfg, float(name[1:])).solver.damping if name != "x1" else cfg.solver.damping,
                         "pearson": correlations(pred[rows], actual, np.random.default_rng(0), n_boot=0)["pearson"]}
                  for name, (pred, _) in predictions.items()}
    table = pd.DataFrame({"train_id": np.asarray(train.ids, dtype=object)[rows],
                          "predicted_loss_change": predicted[rows], "actual_loss_change": actual,
                          "retrain_grad_norm": [r.grad_norm for r in results],
                          "actual_error_estimate": [r.actual_error for r in results]})
    tables = {"verify.csv": table}
    summary: dict[str, Any] = {"command": "verify", "n": train.n, "samples": len(rows), "test_examples": len(rows_t),
                               "solver": cfg.solver.name, **stats, "pearson_by_damping": by_damping,
                               "estimated_seconds": eta, "reference_grad_norm": reference.grad_norm}
    warnings = []
    if group_map is not None:
        with timer("groups"):
            frame = group_effects(problem, solvers["x1"], mean_ihvp, group_map,
                                  lambda: source.per_example(problem.train_loader, train.ids),
                                  test_hvp=mean_loss_hvp(problem, test_loader, len(rows_t)))
            removed = retrain_groups(problem, [group_map[g] for g in frame["group"]], test_loss, cfg.train,
                                     threads=threads, shuffled=shuffled, reference=reference)
        frame["actual_loss_change"] = [r.actual_loss_change for r in removed]
        tables["groups_verify.csv"] = frame
        summary["groups"] = {order: _group_fit(frame[column], frame["actual_loss_change"])
                             for order, column in (("first_order", "loss_change_if_removed"),
                                                   ("second_order", "loss_change_if_removed_2nd"))}
    unconverged = sum(not r.converged for r in results)
    errors = np.abs([r.actual_error for r in results], dtype=float)
    resolved = bool(np.all(np.isfinite(errors))) and errors.max(initial=0.0) <= 0.1 * np.median(np.abs(actual))
    summary["max_retrain_error_estimate"] = float(errors.max(initial=0.0)) if np.all(np.isfinite(errors)) else None
    if (unconverged or not reference.converged) and not resolved:
        warnings.append(f"{unconverged} of {len(results)} retrains (and the reference: "
                        f"{'converged' if reference.converged else 'not converged'}) stopped above "
                        f"train.tol={cfg.train.tol:g} and their estimated error is not small against the measured changes;"
                        " raise train.epochs or lower train.tol")
    result = pipeline._finish("verify", inp, solvers["x1"], timer, summary, tables)
    result.warnings.extend(warnings)
    return result


def _group_fit(predicted: pd.Series, actual: pd.Series) -> dict[str, float]:
    pred, act = predicted.to_numpy(dtype=float), actual.to_numpy(dtype=float)
    pearson = float(np.corrcoef(pred, act)[0, 1]) if len(pred) > 1 and pred.std() > 0 and act.std() > 0 else float("nan")
    return {"pearson": pearson, "mean_abs_error": float(np.mean(np.abs(pred - act))),
            "magnitude_ratio": float(np.abs(pred).sum() / max(np.abs(act).sum(), 1e-300))}


def _agreement(reference: pd.Series, values: pd.Series, command: str) -> dict[str, float]:
    ref, alt = reference.to_numpy(dtype=float), values.to_numpy(dtype=float)
    descending = command == "selfcheck"  # selfcheck: high = suspicious; rank: most harmful = most negative
    key_ref, key_alt = (ref, alt) if descending else (-ref, -alt)
    k = max(1, int(np.ceil(0.1 * len(ref))))
    top_ref = np.argsort(-key_ref, kind="stable")[:k]
    top_alt = set(np.argsort(-key_alt, kind="stable")[:k].tolist())
    return {"spearman": _spearman(ref, alt), "spearman_top": _spearman(ref[top_ref], alt[top_ref]),
            "top10pct_overlap": len(top_alt & set(top_ref.tolist())) / k}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
