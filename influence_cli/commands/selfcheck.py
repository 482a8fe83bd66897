"""`infl selfcheck`: self-influence g_i^T H^-1 g_i of every training row, ranked, with flags.

Also each row's training-loss rank and an estimate of its leave-one-out loss (signals.py). The rows
are scored in resumable shards; a solver that scores rows without their p-sized gradients (a
`RowScorer`, EK-FAC's outer products) does so. The objective's value and gradient at the checkpoint
come from the same pass: summed per-example gradients, or for EK-FAC the layers' summed outer
products (factored.ekfac_scored_rows); only another RowScorer needs a separate objective pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import distributed, report
from ..cache import content_key
from ..errors import ConfigError
from ..factored import FactoredGradients, ekfac_scored_rows
from ..gradients import GradientSource
from ..health import accuracy_warnings, class_table, group_table
from ..resume import shared
from ..run import PhaseFn, Report, Run
from ..scores import self_influence
from ..signals import loo_loss, loo_loss_first_order, loss_rank
from ..solvers import Factored, RowScorer
from ..solvers.ekfac import EkfacSolver
from ..suspicion import (
    FLAG_METHOD,
    FLAG_METHOD_REGRESSION,
    NEWTON_MAX_CLASSES,
    ONE_FIT_LOSS_WEIGHT,
    SUSPICION_METHOD,
    SUSPICION_METHOD_FIRST_ORDER,
    SUSPICION_METHOD_REGRESSION,
    class_probs,
    fit_temperature,
    flag_errors,
    flag_most_suspect,
    flag_residuals,
    label_margin,
    suspicion,
)
from .images import suspect_sheets
from .sweep import damping_sweep

RANK_BY = ("suspicion", "self_influence", "loo_loss", "loss")
GALLERIES = ("sheet", "per-class", "none")
NEWTON_LOO_MAX_P = 50_000  # the Newton pass holds (B, C, p) Jacobian blocks: beyond this, the first-order form
MEMORIZED_LOSS = 0.02  # mean training loss below which a classifier has memorized its labels
# ... or the share of its training labels it predicts, at or above which it has: such a model can show at most a 1%
# error rate by disagreeing. 0.995 left 150-row MLPs that fit all but one noisy label (99.3%) to the one-fit audit,
# 0.08-0.24 short of cleanlab on iris (benchmarks/label_errors.md, draws 0-2)
MEMORIZED_ACCURACY = 0.99


@dataclass(frozen=True)
class SelfcheckOptions:
    rank_by: str = "suspicion"
    damping_sweep: bool = False
    group_by: str | None = None
    gallery: str = "sheet"  # image data: suspects.png | per-class: one sheet per given label | none
    # K: out-of-fold outputs of K fresh models (crossfit.py) instead of Newton LOO; 0: never; None: selfcheck.cross_fit
    cross_fit: int | None = None

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_BY:
            raise ConfigError(f"--rank-by: {self.rank_by!r} is not one of {', '.join(RANK_BY)}")
        if self.cross_fit is not None and (isinstance(self.cross_fit, bool) or self.cross_fit == 1
                                           or self.cross_fit < 0):
            raise ConfigError(f"--cross-fit: the number of folds must be >= 2 (0: never), got {self.cross_fit}")
        if self.gallery not in GALLERIES:
            raise ConfigError(f"--gallery: {self.gallery!r} is not one of {', '.join(GALLERIES)}")


def selfcheck(run: Run, options: SelfcheckOptions = SelfcheckOptions()) -> Report:
    """The selfcheck report of an opened run (see the module docstring); under --shard i/N only the
    job's shards of the scored rows, stored in the cache."""
    if options.cross_fit and (run.job is not None or run.merge):
        raise ConfigError("--cross-fit: not with --shard/--merge (its K trainings are not sharded)")
    if run.job is not None:
        run.fit()
        rows = _scored_rows(run)
        return run.finish_shard(rows["shards"] - rows["reused"], rows["reused"])
    tables, summary = score(run, options)
    if options.damping_sweep:
        summary["damping_sweep"] = damping_sweep(run, tables, lambda: score(run, options, full=False)[0], "selfcheck.csv",
                                                 "self_influence", descending=True)
    if options.gallery != "none" and run.cfg.task != "regression":
        with run.timer("gallery"):
            split_cfg = run.cfg.data.train
            tables.update(suspect_sheets(run.train, tables["selfcheck.csv"], split_cfg.mean, split_cfg.std,
                                         per_class=options.gallery == "per-class"))
    return run.finish(summary, tables, exact_check=True)


def score(run: Run, options: SelfcheckOptions, full: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tables, summary) at the run's damping: fit (or reuse) the solver, then score every row.
    full=False (the damping sweep) skips the Newton leave-one-out pass and uses the first-order one."""
    solver = run.fit()
    problem, train, n = run.problem, run.train, run.train.n
    early = full and distributed.active()  # torchrun: cross-fit while every rank is in the group (the pass ends it)
    if early:
        folds, plan = _cross_fit_plan(run, options, *_checkpoint_fit(run))
        oof = _out_of_fold(run, folds) if folds is not None else None
    rows = _scored_rows(run)
    with run.timer("checkpoint_gradient"):
        if rows["grad_sum"] is None:  # a RowScorer's pass that sums no gradient: one objective pass
            stored, _ = run.cache.cached(f"objective-gradient-{content_key(run.base_key)}", lambda: dict(
                zip(("value", "grad"), GradientSource(problem).objective_gradient(), strict=True)))
            value, grad_j = stored["value"], stored["grad"].to(run.device)
        else:
            value, grad_j = run.objective_at_checkpoint(float(rows["loss"].sum()), rows["grad_sum"])
    pred, si, loss = rows["pred"], rows["si"], rows["loss"]
    classification = run.cfg.task != "regression"
    labels = train.labels.numpy().reshape(n).astype(np.int64) if classification else None
    mismatch = pred != labels if classification else None
    if not early:
        accuracy = None if mismatch is None else 1 - float(mismatch.mean()) if n else 0.0
        folds, plan = _cross_fit_plan(run, options, float(loss.mean()) if n else 0.0, accuracy, n) if full else (
            None, None)
        oof = _out_of_fold(run, folds) if folds is not None else None
    with run.timer("audit"):
        audit = _audit(run, solver, rows, newton=full, oof=oof, folds=folds)
    flagged = audit["flags"].flagged if run.cfg.selfcheck.flag_fraction is None else _top_fraction(
        audit["suspicion"], run.cfg.selfcheck.flag_fraction)
    if run.cfg.selfcheck.flag_requires_mismatch and mismatch is not None:
        flagged = flagged & mismatch
    predicted = train.label_names(torch.from_numpy(pred)) if classification else pred
    suggested = None
    if classification:
        names = np.asarray(train.label_names(torch.from_numpy(audit["flags"].suggested.clip(min=0))), dtype=object)
        suggested = np.where(flagged, names, "")
    key = {"suspicion": audit["suspicion"], "self_influence": si, "loo_loss": audit["loo"], "loss": loss}[
        options.rank_by]
    table = report.selfcheck_table(train.ids, train.label_names(train.labels), predicted, rows["prob"], loss, si,
                                   flagged, suggested, train.extra,
                                   {"loss_rank": loss_rank(loss), "loo_loss": audit["loo"]}, key,
                                   suspicion=audit["suspicion"])
    flags = audit["flags"]
    summary: dict[str, Any] = {
        "command": "selfcheck", "n": n, "parameters": problem.params.size, "solver": solver.name,
        "rank_by": options.rank_by, "suspicion_method": audit["method"], "flag_method": audit["flag_method"],
        "loo_loss_method": audit["loo_method"],
        "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
        "estimated_error_rate": flags.error_rate, "estimated_error_rate_ci90": list(flags.interval),
        **({"oof_temperature": audit["oof_temperature"]} if "oof_temperature" in audit else {}),
        "objective_at_checkpoint": value, "grad_norm_at_checkpoint": float(grad_j.norm()),
    }
    if plan is not None:
        summary["cross_fit"] = plan
        summary["flags_trusted"] = not (plan["memorized"] and folds is None)
        if not summary["flags_trusted"]:
            run.warnings.append(_memorized_warning(float(loss.mean()), 1 - float(mismatch.mean()), plan))
    if mismatch is not None:
        summary["train_accuracy"] = float(1 - mismatch.mean())
        run.warnings.extend(accuracy_warnings(summary["train_accuracy"], "check the checkpoint and `infl train`"))
    summary["cache"] = {"fit_reused": run.fit_reused, "shards": rows["shards"], "shards_reused": rows["reused"]}
    tables = {"selfcheck.csv": table}
    if classification:
        per_row = flags.class_error_rate[labels] if len(flags.class_error_rate) else None
        tables["classes.csv"] = class_table(train.label_names(train.labels), flagged, suggested, per_row)
    groups = run.group_rows(options.group_by)
    if groups is not None:
        names = np.empty(n, dtype=object)
        for name, members in groups.items():
            names[members] = name
        tables["selfcheck_groups.csv"] = group_table(names, flagged, audit["suspicion"], None)
    return tables, summary


def _cross_fit_plan(run: Run, options: SelfcheckOptions, mean_loss: float, accuracy: float | None, n: int
                    ) -> tuple[int | None, dict[str, Any]]:
    """(folds to cross-fit or None, the summary's `cross_fit` block), from the checkpoint's mean training loss and
    the fraction of its labels predicted (None for regression) over n rows. --cross-fit K overrides
    selfcheck.cross_fit; `auto` cross-fits AUTO_FOLDS folds when a classifier memorized its labels (mean training
    loss under MEMORIZED_LOSS, or MEMORIZED_ACCURACY of its labels predicted: one fit cannot see what it
    memorized; on data that is in fact clean the out-of-fold audit agrees, at the trainings' cost) and
    crossfit.estimate_seconds says the trainings fit in selfcheck.cross_fit_budget and there are at least
    AUTO_MIN_ROWS rows (two per fold: fewer leaves folds that train on almost nothing). Under torchrun the ranks
    share the folds, so the estimate is of one rank's share. A --merge computes nothing, so it never cross-fits."""
    from ..crossfit import AUTO_FOLDS, AUTO_MIN_ROWS, estimate_seconds

    explicit = options.cross_fit is not None
    setting = options.cross_fit if explicit else run.cfg.selfcheck.cross_fit
    memorized = accuracy is not None and n > 0 and (mean_loss < MEMORIZED_LOSS or accuracy >= MEMORIZED_ACCURACY)
    plan: dict[str, Any] = {"setting": setting, "set_by": "--cross-fit" if explicit else "selfcheck.cross_fit",
                            "memorized": memorized, "folds": None}
    world = distributed.world()
    if world is not None:
        plan["ranks"] = world.size  # the folds are shared by this many processes (_out_of_fold)
    if setting == 0 or run.merge or (setting == "auto" and not memorized):
        return None, plan
    if setting != "auto":
        return int(setting), {**plan, "folds": int(setting)}
    if n < AUTO_MIN_ROWS:
        return None, {**plan, "skipped": f"{n} rows, under the {AUTO_MIN_ROWS} that {AUTO_FOLDS} folds need"}
    budget = run.cfg.selfcheck.cross_fit_budget
    per_rank = -(-AUTO_FOLDS // plan.get("ranks", 1))  # torchrun: the ranks share the folds
    with run.timer("cross_fit_estimate"):
        estimate = estimate_seconds(run.cfg, run.train, run.problem.objective, run.device, run.dtype, per_rank,
                                    budget)
    # torchrun: every rank times its own estimate; rank 0's decision holds on all, or they would part ways
    folds = AUTO_FOLDS if distributed.agree(estimate <= budget) else None
    return folds, {**plan, "folds": folds, "estimated_s": estimate, "budget_s": budget}


def _memorized_warning(mean_loss: float, accuracy: float, plan: dict[str, Any]) -> str:
    """What a user reads when a memorizing model's flags come from one fit (see _cross_fit_plan)."""
    if "skipped" in plan:
        why = f"the automatic out-of-fold trainings (selfcheck.cross_fit: auto) did not run: {plan['skipped']}"
    elif "estimated_s" in plan:
        why = ("the automatic out-of-fold trainings (selfcheck.cross_fit: auto) were estimated at up to"
               f" {plan['estimated_s']:.0f} s, over selfcheck.cross_fit_budget ({plan['budget_s']:.0f} s),"
               " so they did not run")
    elif plan["setting"] == 0:
        why = "cross-fitting is off (" + ("--cross-fit 0" if plan["set_by"] == "--cross-fit"
                                          else "selfcheck.cross_fit: 0") + ")"
    else:
        why = "--merge cross-fits nothing"
    return (f"the model fits its training labels almost exactly (mean loss {mean_loss:.2g}, {accuracy:.1%} of them"
            " predicted): what it memorized, one"
            f" fit cannot see, so the flags undercount (benchmarks/label_errors.md); {why}. Audit it with"
            " `--cross-fit 5` (out-of-fold outputs of 5 fresh models), or a model that cannot memorize"
            " (params: last_layer, more weight_decay)")


def _checkpoint_fit(run: Run) -> tuple[float, float | None, int]:
    """(mean training loss, fraction of the labels predicted or None for regression, rows) at the checkpoint: one
    forward pass over this rank's rows, summed over the ranks (what _cross_fit_plan decides on under torchrun,
    before the scoring pass that gives one process the same figures row by row)."""
    local, _ = distributed.part(run.problem.train_loader)
    model, objective, device = run.problem.model, run.problem.objective, run.device
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for _, x, y in local:
            out, y = model(x.to(device)), y.to(device)
            loss_sum += float(objective.per_example_loss(out, y).double().sum())
            count += len(y)
            if run.cfg.task == "classification":
                correct += float((out.reshape(len(y), -1).argmax(1) == y.reshape(-1).long()).sum())
            elif run.cfg.task == "binary":
                correct += float(((out.reshape(-1) > 0) == (y.reshape(-1) > 0.5)).sum())
    loss_sum, correct, count = distributed.sum_numbers(loss_sum, correct, count)
    n = int(round(count))
    mean = loss_sum / n if n else 0.0
    return mean, None if run.cfg.task == "regression" else (correct / n if n else 0.0), n


def _out_of_fold(run: Run, folds: int) -> np.ndarray:
    """(n, C) out-of-fold outputs of `folds` fresh models (crossfit.py), cached by content. Under torchrun rank r
    of R trains the folds k = r mod R and the ranks sum their parts (each holds only its folds' rows)."""
    from ..crossfit import out_of_fold_outputs

    key = content_key({"base": run.base_key, "folds": folds, "train": repr(run.cfg.train),
                       "model": repr(run.cfg.model), "seed": run.cfg.seed, "batch_size": run.cfg.batch_size})
    world = distributed.world()
    part = (world.rank, world.size) if world is not None else (0, 1)

    def compute() -> dict[str, Any]:
        mine = out_of_fold_outputs(run.cfg, run.train, run.problem.objective, run.device, run.dtype, folds,
                                   run.progress, part=part)
        return {"outputs": distributed.all_sum(torch.from_numpy(mine)), "folds": folds}

    with run.timer("cross_fit"):
        stored, _ = shared(run.cache, f"cross-fit-{key}", compute, "the out-of-fold outputs")
    return stored["outputs"].numpy()


def _audit(run: Run, solver: Any, rows: dict[str, Any], newton: bool, oof: np.ndarray | None = None,
           folds: int | None = None) -> dict[str, Any]:
    """Suspicion and flags (suspicion.py): from the out-of-fold outputs `oof` (n, C) of `folds` folds when
    given (_out_of_fold);
    else from the Newton leave-one-out outputs when the solver is factored and the output is at most
    NEWTON_MAX_CLASSES wide (about C self-influence passes), else from the first-order leave-one-out
    loss and one forward pass."""
    problem, n, task = run.problem, run.train.n, run.cfg.task
    newton = (newton and oof is None and isinstance(solver, Factored)
              and _output_width(run) <= NEWTON_MAX_CLASSES and problem.params.size <= NEWTON_LOO_MAX_P)
    if oof is not None:
        outputs = oof
        loo = _held_out_loss(run, outputs)
        loo_method, source = f"cross_fit({folds})", "oof"
    elif newton:
        res = loo_loss(problem, solver, progress=run.phase("loo"))
        loo, outputs = res.loo_loss, res.loo_outputs
        loo_method, source = "newton", "loo"
    else:
        loo = loo_loss_first_order(rows["loss"], rows["si"], n)
        outputs = None if task == "regression" else _train_outputs(run)
        loo_method, source = "first_order", "train"
    if task == "regression":
        method = SUSPICION_METHOD_REGRESSION if source == "loo" else f"rank_mean(loss,{_LOSS_NAME[source]})"
        return {"suspicion": suspicion(rows["loss"], loo), "loo": loo, "flags": flag_residuals(loo),
                "method": method, "flag_method": FLAG_METHOD_REGRESSION, "loo_method": loo_method}
    labels = run.train.labels.numpy().reshape(n).astype(np.int64)
    probs = class_probs(outputs)
    flag_probs, extra = probs, {}
    if source == "oof":  # out-of-fold outputs of memorizing models are overconfident: flag on calibrated ones
        extra["oof_temperature"] = fit_temperature(outputs, labels)
        flag_probs = class_probs(outputs / extra["oof_temperature"])
    method = {"loo": SUSPICION_METHOD, "train": SUSPICION_METHOD_FIRST_ORDER,
              "oof": "rank_mean(loss,oof_loss,oof_margin)"}[source]
    flag_method = {"loo": FLAG_METHOD, "train": "confident_learning_count(train_probs),top_suspicion",
                   "oof": "confident_learning_count(temperature_scaled_oof_probs),top_suspicion"}[source]
    weight = None if source == "oof" else ONE_FIT_LOSS_WEIGHT  # one fit: the loss leads (suspicion.py)
    score = suspicion(rows["loss"], loo, label_margin(probs, labels), weight)
    flags = flag_most_suspect(flag_errors(labels, flag_probs, seed=run.cfg.seed), score, labels, flag_probs)
    return {"suspicion": score, "loo": loo, "flags": flags, "method": method, "flag_method": flag_method,
            "loo_method": loo_method, **extra}


_LOSS_NAME = {"oof": "oof_loss", "train": "loo_loss_first_order"}


def _held_out_loss(run: Run, outputs: np.ndarray) -> np.ndarray:
    """(n,) each row's loss under the out-of-fold outputs (the task's own per-example loss)."""
    out = torch.from_numpy(outputs)
    labels = run.train.labels
    target = labels.to(torch.float64).reshape(out.shape) if run.cfg.task != "classification" else labels.long()
    with torch.no_grad():
        return run.problem.objective.per_example_loss(out, target).double().numpy().reshape(-1)


def _train_outputs(run: Run) -> np.ndarray:
    """(n, C) model outputs on the training rows: one forward pass, no gradients."""
    out = None
    with torch.no_grad():
        for idx, x, _ in run.stream(run.train):
            o = run.problem.model(x.to(run.device)).double().cpu()
            o = o.reshape(len(idx), -1)
            out = np.zeros((run.train.n, o.shape[1])) if out is None else out
            out[idx.numpy()] = o.numpy()
    return out if out is not None else np.zeros((0, 1))


def _top_fraction(values: np.ndarray, fraction: float) -> np.ndarray:
    """selfcheck.flag_fraction: exactly the top ceil(fraction n) rows by `values`."""
    return report.top_mask(values, int(np.ceil(fraction * len(values))))


def _scored_rows(run: Run) -> dict[str, Any]:
    """Per-row self-influence, loss, prediction and probability of the label, over resumable shards."""
    n, task = run.train.n, run.cfg.task
    out: dict[str, Any] = {"si": np.zeros(n), "loss": np.zeros(n),
                           "pred": np.zeros(n) if task == "regression" else np.zeros(n, dtype=np.int64),
                           "prob": None if task == "regression" else np.zeros(n),
                           "grad_sum": torch.zeros(run.problem.params.size, dtype=torch.float64),
                           "shards": 0, "reused": 0}
    with run.timer("score"):
        for rows, part, reused in run.shards("selfcheck", {}, lambda rows, tick: _score_shard(run, rows, tick)):
            window = slice(rows.start, rows.stop)
            for name in ("si", "loss", "pred"):
                out[name][window] = part[name].numpy()
            if out["prob"] is not None:
                out["prob"][window] = part["prob"].numpy()
            if part["grad_sum"] is None or out["grad_sum"] is None:  # a shard stored without it
                out["grad_sum"] = None
            else:
                out["grad_sum"] += part["grad_sum"]
            out["shards"] += 1
            out["reused"] += reused
    return out


def _score_shard(run: Run, rows: range, tick: PhaseFn | None) -> dict[str, Any]:
    """selfcheck's per-row results for one shard of training rows (contiguous `rows`)."""
    problem, solver, count = run.problem, run.fitted(), len(rows)
    loader = run.stream(run.train, rows)
    scorer = solver if isinstance(solver, RowScorer) else None
    summed = scorer is None or isinstance(solver, EkfacSolver)  # the pass also sums the rows' gradients
    if isinstance(solver, EkfacSolver):
        blocks: Any = ekfac_scored_rows(problem, solver.state(), loader, tick, run.train.n, run.train.ids)
    elif scorer is not None:
        blocks = scorer.self_influence_blocks(loader, tick, run.train.n, run.train.ids)
    else:  # per-example gradients from layer factors where the model allows (as rank's), else vmap
        factored, _ = FactoredGradients.plan(problem)
        blocks = (factored.per_example(loader, run.train.ids, tick, run.train.n, reuse=True) if factored is not None
                  else GradientSource(problem).per_example(loader, run.train.ids, tick, run.train.n))
    out = {"si": torch.zeros(count, dtype=torch.float64), "loss": torch.zeros(count, dtype=torch.float64),
           "pred": torch.zeros(count, dtype=torch.float64 if run.cfg.task == "regression" else torch.int64),
           "prob": torch.zeros(count, dtype=torch.float64),
           "grad_sum": torch.zeros(problem.params.size, dtype=torch.float64) if summed else None}
    for block in blocks:
        local = block.idx - rows.start
        if scorer is None:
            out["si"][local] = self_influence(block.grads, solver).cpu()
            out["grad_sum"] += block.grads.double().sum(0).cpu()  # the objective's gradient, for free
        else:
            out["si"][local] = block.self_influence.double().cpu()
            if summed:
                out["grad_sum"] += block.grad_sum.cpu()
        out["loss"][local] = block.losses.detach().double().cpu()
        p_hat, p_label = problem.objective.predict(block.outputs, block.targets)
        out["pred"][local] = p_hat.detach().cpu().to(out["pred"].dtype)
        if p_label is not None:
            out["prob"][local] = p_label.detach().double().cpu()
    return out


def _output_width(run: Run) -> int:
    """Columns of the output Hessian (C for C classes): one forward of the first training row."""
    problem = run.problem
    _, x, y = next(iter(run.stream(run.train, range(0, 1))))
    with torch.no_grad():
        out = problem.model(x.to(problem.device))
    return int(problem.objective.output_hessian(out, y.to(problem.device))[0].shape[1])
