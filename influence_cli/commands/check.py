"""`infl check`: validate the config, load data and model, estimate each solver's time and memory.

Nothing heavy runs: the estimates come from unit costs timed warm on one batch (estimates.py: a per-example
gradient, an HVP on 1 and 32 vectors, a small factorization, EK-FAC's fit on one batch) scaled to n. Besides
every solver's fit, the configured solver gets its selfcheck and rank phases, and refine's cost (HVP passes x
the time of one pass over the training rows for the test rows) with a warning when it dominates the rank.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from .. import estimates, resume
from ..errors import ConfigError
from ..gradients import GradientSource
from ..run import Report, Run
from ..solvers import SOLVERS, choose

REFINE_DOMINATES = 0.5  # warn when refine's passes are more than this share of the estimated rank
REFINE_WARN_SECONDS = 10.0  # ... and take at least this long (a second of refine is no news)


def check(run: Run) -> Report:
    """n, parameter counts, the solver (and why, for auto), the cache state and every solver's estimates."""
    cfg, problem, n, p = run.cfg, run.problem, run.train.n, run.problem.params.size
    name, reason = choose(cfg.solver, problem) if cfg.solver.name == "auto" else (cfg.solver.name, "configured")
    grad_s = gradient_seconds(run)
    units = estimates.measure(problem, grad_s)
    estimates_by_solver, fits = {}, {}
    for solver_name, cls in SOLVERS.items():
        cost = cls.estimate(cfg.solver, n, p)
        try:
            fits[solver_name] = estimates.fit_seconds(solver_name, cfg.solver, units)
        except ConfigError as e:  # ekfac on layers it cannot factor
            fits[solver_name] = None
            cost = replace(cost, note=f"not applicable: {e.message}")
        estimates_by_solver[solver_name] = {
            "memory_bytes": cost.memory_bytes, "fit_seconds": _round(fits[solver_name]), "note": cost.note}
    n_test = run.test.n if run.test else None
    try:
        phases = phase_estimates(name, cfg.solver, units, fits.get(name) or 0.0, n_test)
    except ConfigError as e:  # the configured solver cannot run on this model: its estimate says why
        phases = {"not_applicable": e.message}
    warnings = []
    refine = phases.get("refine")
    if refine and refine["seconds"] > max(REFINE_DOMINATES * phases["rank_seconds"], REFINE_WARN_SECONDS):
        warnings.append(
            f"{name}: refine {refine['steps']} costs ~{refine['seconds']:.3g} s of the ~{phases['rank_seconds']:.3g} s"
            f" estimated for rank ({refine['hvp_passes']} HVP passes x ~{refine['seconds_per_pass']:.3g} s for"
            f" {refine['test_rows']} test rows); lower solver.{name}.refine (0: no HVP passes) or rank fewer"
            " --test-ids")
    if refine:
        estimates_by_solver[name]["note"] += (f"; rank: refine {refine['steps']} = {refine['hvp_passes']} HVP passes"
                                              f" x ~{refine['seconds_per_pass']:.3g} s = ~{refine['seconds']:.3g} s")
    key = resume.solver_key(run.base_key, cfg, name)
    summary: dict[str, Any] = {
        "command": "check", "n": n, "n_test": n_test, "parameters": p,
        "cache": {"dir": str(run.cache.root) if run.cache.root else None,
                  "fit_cached": run.cache.has(resume.fit_name(name, key))},
        "parameters_total": sum(q.numel() for q in problem.model.parameters()),
        "selected": list(problem.params.names), "selected_by_module": problem.params.by_module(), "solver": name, "solver_reason": reason, "device": str(run.device),
        "gradient_seconds": round(grad_s, 2), "solver_estimates": estimates_by_solver, "phase_estimates": phases,
        "config": cfg.to_dict(),
    }
    if cfg.task != "regression" and cfg.selfcheck.cross_fit != 0:
        summary["cross_fit"] = cross_fit_estimate(run)
    if run.test is not None and (groups := run.group_rows(None)) and cfg.rank.group_retrain is not False:
        summary["group_retrain"] = group_retrain_estimate(run, len(groups))
    return Report({}, summary, {"phases": run.timer.phases}, warnings)


def phase_estimates(name: str, config: Any, units: estimates.Units, fit: float, n_test: int | None) -> dict[str, Any]:
    """Seconds of the configured solver's selfcheck and rank phases (manifest phase names) and refine's cost."""
    n, p = units.n, units.p
    if name == "ekfac":
        score = estimates.ekfac_row(units, config)[0] / 2 * n  # one of the fit's two passes
    elif name in ("cg", "lissa"):
        score = estimates.solve_seconds(name, config, units, n) + units.gradient_pass()
    else:  # direct, arnoldi: the gradient pass and a triangular solve / projection per row
        per_row = p * p if name == "direct" else 2 * p * min(p, config.arnoldi.rank)
        score = units.gradient_pass() + n * per_row / units.flops
    out: dict[str, Any] = {"fit": _round(fit), "selfcheck_score": _round(score),
                           "selfcheck_seconds": _round(fit + score + units.gradient_pass())}
    if n_test:
        solve = estimates.solve_seconds(name, config, units, n_test)
        rank_score = solve + units.gradient_pass()
        out.update(rank_test_gradients=_round(units.gradient_pass(n_test)), rank_solve=_round(solve),
                   rank_score=_round(rank_score), rank_seconds=_round(fit + rank_score + units.gradient_pass(n_test)))
        steps = getattr(config, name).refine if name in ("ekfac", "arnoldi") else 0
        passes = estimates.solve_passes(name, config, p) if steps else 0
        if passes:
            per_pass = units.hvp_pass(n_test)
            out["refine"] = {"steps": steps, "hvp_passes": passes, "test_rows": n_test,
                             "seconds_per_pass": _round(per_pass), "seconds": _round(passes * per_pass)}
    return out


def cross_fit_estimate(run: Run) -> dict[str, Any]:
    """What selfcheck's out-of-fold fits would cost (selfcheck.cross_fit: K, or auto's 5 when the model memorized
    its labels), priced as selfcheck prices them (crossfit.estimate_seconds, a few batches)."""
    from ..crossfit import AUTO_FOLDS, estimate_seconds

    setting, budget = run.cfg.selfcheck.cross_fit, run.cfg.selfcheck.cross_fit_budget
    folds = AUTO_FOLDS if setting == "auto" else int(setting)
    seconds = estimate_seconds(run.cfg, run.train, run.problem.objective, run.device, run.dtype, folds)
    return {"setting": setting, "folds": folds, "estimated_s": _round(seconds), "budget_s": budget}


def group_retrain_estimate(run: Run, groups: int) -> dict[str, Any]:
    """What rank's group retrains would cost (rank.group_retrain, commands/rank_groups.py): one training each,
    priced as rank prices the first (rank_groups.retrain_seconds)."""
    from .rank_groups import retrain_seconds

    each = retrain_seconds(run)
    return {"setting": run.cfg.rank.group_retrain, "groups": groups, "each_s": _round(each),
            "budget_s": run.cfg.rank.group_retrain_budget}


def gradient_seconds(run: Run) -> float:
    """Estimated seconds of one per-example-gradient pass over the training rows: one batch read
    and computed to warm up (allocations, kernel selection), then the next three batches read (image files
    are decoded as they stream) and computed, each timed, and the median scaled to n."""
    source, size, n = GradientSource(run.problem), run.cfg.batch_size, run.train.n
    for _ in source.per_example(run.stream(run.train, range(0, min(size, n)))):
        pass
    per_row = []
    for k in range(1, 4):  # the median of up to three timed batches: one batch is at the mercy of a shared machine
        timed = range(k * size, min((k + 1) * size, n)) if n > k * size else range(0, min(size, n))
        start = time.perf_counter()
        for _ in source.per_example(run.stream(run.train, timed)):
            pass
        per_row.append((time.perf_counter() - start) / len(timed))
    return float(np.median(per_row)) * n


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else float(f"{seconds:.3g}")
