"""`infl check`: validate the config, load data and model, estimate each solver's time and memory.

Nothing heavy runs: the per-example-gradient estimate times one warm batch and scales it to n.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import resume
from ..gradients import GradientSource
from ..run import Report, Run
from ..solvers import SOLVERS, choose

_FLOPS: list[float] = []


def check(run: Run) -> Report:
    """n, parameter counts, the solver (and why, for auto), the cache state and every solver's estimates."""
    cfg, problem, n, p = run.cfg, run.problem, run.train.n, run.problem.params.size
    name, reason = choose(cfg.solver, problem) if cfg.solver.name == "auto" else (cfg.solver.name, "configured")
    estimates = {}
    for solver_name, cls in SOLVERS.items():
        cost = cls.estimate(cfg.solver, n, p)
        estimates[solver_name] = {"memory_bytes": cost.memory_bytes, "fit_seconds": round(cost.fit_flops / _flops(), 2),
                                  "note": cost.note}
    key = resume.solver_key(run.base_key, cfg, name)
    summary: dict[str, Any] = {
        "command": "check", "n": n, "n_test": run.test.n if run.test else None, "parameters": p,
        "cache": {"dir": str(run.cache.root) if run.cache.root else None,
                  "fit_cached": run.cache.has(resume.fit_name(name, key))},
        "parameters_total": sum(q.numel() for q in problem.model.parameters()),
        "selected": list(problem.params.names), "solver": name, "solver_reason": reason, "device": str(run.device),
        "gradient_seconds": round(gradient_seconds(run), 2), "solver_estimates": estimates, "config": cfg.to_dict(),
    }
    return Report({}, summary, {"phases": run.timer.phases})


def gradient_seconds(run: Run) -> float:
    """Estimated seconds of one per-example-gradient pass over the training rows: one batch read
    and computed to warm up (allocations, kernel selection), then the next batch read (image files
    are decoded as they stream) and computed, timed, and scaled to n."""
    source, size, n = GradientSource(run.problem), run.cfg.batch_size, run.train.n
    for _ in source.per_example(run.stream(run.train, range(0, min(size, n)))):
        pass
    timed = range(size, min(2 * size, n)) if n > size else range(0, n)
    start = time.perf_counter()
    for _ in source.per_example(run.stream(run.train, timed)):
        pass
    return (time.perf_counter() - start) / len(timed) * n


def _flops() -> float:
    """float64 matmul speed of this device, measured once (for estimates only)."""
    if not _FLOPS:
        a = torch.randn(512, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        _FLOPS.append(4 * 2 * 512**3 / max(time.perf_counter() - start, 1e-6))
    return _FLOPS[0]
