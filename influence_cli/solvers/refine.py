"""Refinement shared by the approximate factored solvers (ekfac, arnoldi): a few steps of block preconditioned
conjugate gradients on exact full-data HVPs, preconditioned by the solver's own approximate inverse M.

The first step is M v itself (optimally rescaled); each further step costs one HVP pass over the training rows
for all columns still active and shrinks the A-norm error, so train->test influence, where approximations
break, ranks like the exact solve after 2 steps (README "Solvers"). Self-influence of every row keeps the
pure factored form: a solve per row would cost an HVP pass per row.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

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
    """Block preconditioned CG for A x = b, b (k, p) float64, A = `hvp` (symmetric, positive definite expected),
    M = `precondition`, all columns in lockstep: from x = 0, 1 + `steps` steps. The first step is the solver's
    own answer M b, optimally rescaled; each further step refines it, and the result minimizes the A-norm error over
    span{M b, (M A) M b, ..., (M A)^steps M b}: at least as accurate as `steps` CG steps started from x_0 = M b,
    for the same 1 + `steps` `hvp` calls (each on the columns still active). A column stops early when its
    relative residual is <= REFINE_STOP (so with an exact M the answer is M b) or on a direction of non-positive
    curvature (in the first step it then keeps M b). Residuals are the CG recurrence's (b - A x in exact
    arithmetic; no extra pass to measure them); `before` is that of M b itself, b - A M b, from the first step."""
    tiny = torch.finfo(torch.float64).tiny
    b_norm = b.norm(dim=1)
    x, r = torch.zeros_like(b), b.clone()
    d = precondition(b)  # z_0 = M r_0 = M b
    rz = (r * d).sum(1)
    before = (b_norm > 0).to(b.dtype)
    steps_taken = torch.zeros(len(b), dtype=torch.long, device=b.device)
    active = (b_norm > 0).nonzero().flatten()
    for step in range(steps + 1):
        active = active[r[active].norm(dim=1) > REFINE_STOP * b_norm[active]]
        if len(active) == 0:
            break
        ad = hvp(d[active])
        log.passes += 1
        curvature = (d[active] * ad).sum(1)
        ok = curvature > 0
        log.negative_curvature += int((~ok).sum())
        if step == 0:
            before[active] = (b[active] - ad).norm(dim=1) / b_norm[active]
            x[active[~ok]] = d[active[~ok]]  # no usable curvature along M b: keep the solver's own answer
            r[active[~ok]] = b[active[~ok]] - ad[~ok]
        active, ad, curvature = active[ok], ad[ok], curvature[ok]
        alpha = rz[active] / curvature
        x[active] += alpha[:, None] * d[active]
        r[active] -= alpha[:, None] * ad
        steps_taken[active] += 1
        if step < steps and len(active):
            z = precondition(r[active])
            rz_new = (r[active] * z).sum(1)
            d[active] = z + (rz_new / rz[active])[:, None] * d[active]
            rz[active] = rz_new
    log.iterations += (steps_taken - 1).clamp_min(0).tolist()
    log.before += before.tolist()
    log.after += (r.norm(dim=1) / b_norm.clamp_min(tiny)).tolist()
    return x
