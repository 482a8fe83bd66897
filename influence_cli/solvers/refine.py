"""Refinement shared by the approximate factored solvers (ekfac, arnoldi): a few steps of block preconditioned
conjugate gradients (pcg.py, the loop the cg solver runs too) on exact full-data HVPs, preconditioned by the solver's own approximate inverse M.

The first step is M v itself (optimally rescaled); each further step costs one HVP pass over the training rows
for all columns still active and shrinks the A-norm error, which matters most for train->test influence,
where the approximations are weakest. Self-influence of every row keeps the
pure factored form: a solve per row would cost an HVP pass per row.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .pcg import pcg

REFINE_STOP = 1e-12  # a column whose relative residual is below this takes no more CG steps


@dataclass
class RefineLog:
    """What refine did in the ihvp calls since fit: per solve (column) the relative residual of the solver's own
    answer M v (`before`, reported as `<solver>_residual_*`) and of the refined one (`after`), and the CG steps
    taken after the first one; HVP passes; directions of non-positive curvature met."""

    solver: str
    passes: int = 0
    negative_curvature: int = 0
    iterations: list[int] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)

    def describe(self, info: dict[str, Any], steps: int) -> dict[str, Any]:
        """The solver's describe() `info` with the refine setting, this log's summary, and a warning when CG met
        non-positive curvature."""
        info = {**info, "refine": steps, **self.summary()}
        if self.negative_curvature:
            info["warnings"] = [*info.get("warnings", []), (
                f"{self.solver}: refine met {self.negative_curvature} directions of non-positive curvature (the"
                " Hessian is not positive definite; those solves stopped early); raise solver.damping or use"
                " solver.hessian: gauss_newton")]
        return info

    def summary(self) -> dict[str, Any]:
        if not self.after:
            return {}
        return {"refine_solves": len(self.after), "refine_hvp_passes": self.passes,
                "refine_iterations_max": max(self.iterations),
                "refine_residual_max": max(self.after), "refine_residual_median": statistics.median(self.after),
                f"{self.solver}_residual_max": max(self.before),
                f"{self.solver}_residual_median": statistics.median(self.before)}


def refine(hvp: Callable[[Tensor], Tensor], precondition: Callable[[Tensor], Tensor], b: Tensor, steps: int,
            log: RefineLog) -> Tensor:
    """Block preconditioned CG (pcg.py) for A x = b, b (k, p) float64, A = `hvp` (symmetric, positive definite
    expected), M = `precondition`, all columns in lockstep: from x = 0, 1 + `steps` steps. The first step is the
    solver's own answer M b, optimally rescaled; each further step refines it, and the result minimizes the A-norm
    error over span{M b, (M A) M b, ..., (M A)^steps M b}: at least as accurate as `steps` CG steps started from
    x_0 = M b, for the same 1 + `steps` `hvp` calls (each on the columns still active). A column stops early when
    its relative residual is <= REFINE_STOP (so with an exact M the answer is M b) or on a direction of
    non-positive curvature (in the first step it then keeps M b). Residuals are the CG recurrence's (b - A x in
    exact arithmetic; no extra pass to measure them); `before` is that of M b itself, b - A M b."""
    res = pcg(hvp, b, steps + 1, REFINE_STOP, precondition)
    x, after = res.x, res.residual
    if bool(res.stalled.any()):  # no usable curvature along M b: keep the solver's own answer
        x[res.stalled] = precondition(b[res.stalled])
        after[res.stalled] = res.first_residual[res.stalled]
    log.passes += res.passes
    log.negative_curvature += res.negative_curvature
    log.iterations += (res.steps - 1).clamp_min(0).tolist()
    log.before += res.first_residual.tolist()
    log.after += after.tolist()
    return x
