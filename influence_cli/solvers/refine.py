"""Refinement shared by the approximate factored solvers (ekfac, arnoldi): a few steps of block preconditioned
conjugate gradients (pcg.py, the loop the cg solver runs too) on full-data HVPs of the matrix every solver
inverts, A = H + damping I (H per `solver.hessian`, weight decay included: `GradientSource.hvp`), preconditioned
by the solver's own approximate inverse M.

The first step is M v itself (optimally rescaled); each further step costs one HVP pass over the training rows
for all columns still active and, when A is positive definite, shrinks the A-norm error, which matters most for
train->test influence, where the approximations are weakest.

It cannot make an answer worse. While A shows positive curvature along every CG direction of a call, each column
returns its last iterate: CG minimizes the A-norm error over a space that holds M v (first step), so that error is
never above M v's (the residual ||v - A x|| may grow on the way; picking by it instead lowered train->test
Spearman from 0.80 to 0.72 at refine 1 on a digits MLP). Once a direction of non-positive curvature appears in a
call, A is not positive definite and that error is no norm: each column stops where it meets one (further steps
would head for the signed A^-1 rather than the saddle-free |A|^-1 that direct, cg and arnoldi apply there, cg.py)
and returns, of M v and its iterates before it, the one of smallest residual (the recurrence's, exact in exact
arithmetic). On a ReLU MLP trained by Adam (not at a minimum, smallest eigenvalue of A -0.067) that kept ekfac's
refine-1 gain (Spearman 0.20 -> 0.31) where the last iterate would lose it. How many solves kept M v, met non-positive curvature, or ended above their best
residual is in the summary (`RefineLog`).
Why A and not the Gauss-Newton matrix EK-FAC approximates: refining towards GN caps the agreement with the exact
solve at GN's own (Spearman 0.89 per test row on a converged digits MLP 64-32-10, where refine on A reached 0.98
in 8 steps; benchmarks/refine_agreement.py); `solver.hessian: gauss_newton` makes A itself the GN matrix for every
solver. Self-influence of every row keeps the pure factored form: a solve per row would cost an HVP pass per row.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .pcg import pcg

REFINE_STOP = 1e-12  # a column whose relative residual is below this takes no more CG steps


@dataclass
class RefineLog:
    """What refine did in the ihvp calls since fit: per solve (column) the relative residual of the solver's own
    answer M v (`before`, reported as `<solver>_residual_*`) and of the answer returned (`after`), the CG steps
    taken after the first one; HVP passes; directions of non-positive curvature met; solves that kept M v, and
    solves whose residual ended above M v's or above their best iterate's (`grew`: with A positive definite the
    A-norm error still fell; otherwise the best one is returned)."""

    solver: str
    passes: int = 0
    negative_curvature: int = 0
    kept_unrefined: int = 0
    grew: int = 0
    iterations: list[int] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)

    def describe(self, info: dict[str, Any], steps: int) -> dict[str, Any]:
        """The solver's describe() `info` with the refine setting, this log's summary, and a warning when CG met
        non-positive curvature or kept the unrefined answer."""
        info = {**info, "refine": steps, **self.summary()}
        if self.negative_curvature or self.kept_unrefined:
            info["warnings"] = [*info.get("warnings", []), (
                f"{self.solver}: refine met {self.negative_curvature} directions of non-positive curvature in"
                f" {len(self.after)} solves (H + damping I is not positive definite) and kept the unrefined"
                f" {self.solver} answer in {self.kept_unrefined} of them (no CG step lowered its residual); raise"
                " solver.damping or use solver.hessian: gauss_newton")]
        return info

    def summary(self) -> dict[str, Any]:
        if not self.after:
            return {}
        return {"refine_solves": len(self.after), "refine_hvp_passes": self.passes,
                "refine_iterations_max": max(self.iterations),
                "refine_residual_max": max(self.after), "refine_residual_median": statistics.median(self.after),
                f"{self.solver}_residual_max": max(self.before),
                f"{self.solver}_residual_median": statistics.median(self.before),
                "refine_negative_curvature": self.negative_curvature, "refine_kept_unrefined": self.kept_unrefined,
                "refine_residual_grew": self.grew,
                "refine_result": ("refined" if not self.kept_unrefined else
                                  f"{self.solver} answer kept in {self.kept_unrefined} of {len(self.after)} solves")}


def refine(hvp: Callable[[Tensor], Tensor], precondition: Callable[[Tensor], Tensor], b: Tensor, steps: int,
           log: RefineLog) -> Tensor:
    """Block preconditioned CG (pcg.py) for A x = b, b (k, p) float64, A = `hvp` (symmetric), M = `precondition`,
    all columns in lockstep: from x = 0, 1 + `steps` steps. The first step is the solver's own answer M b,
    optimally rescaled; each further step refines it, and with A positive definite the last iterate minimizes the
    A-norm error over span{M b, (M A) M b, ..., (M A)^steps M b}, for 1 + `steps` `hvp` calls (each on the columns
    still active). Where the call met non-positive curvature, each column returns whichever of M b and its
    iterates (before the curvature, where it stops) has the smallest relative residual, never one larger than
    M b's (`before`; see the module docstring). A column stops early when its relative residual is <= REFINE_STOP (so with an
    exact M the answer is M b)."""
    res = pcg(hvp, b, steps + 1, REFINE_STOP, precondition, best=True)
    x, after = res.x, res.residual
    nonzero = b.norm(dim=1) > 0
    keep = torch.zeros_like(nonzero)
    grew = (res.residual > res.first_residual) & nonzero  # positive definite: the A-norm error still fell
    if bool(res.negative.any()):  # not positive definite: the iterate of smallest residual, M b included
        if res.best_x is None or res.best_residual is None or res.grew is None:  # pcg keeps them with negative
            raise RuntimeError("internal: pcg reported negative curvature without its best iterate")
        x, after, grew = res.best_x, res.best_residual, res.grew
        keep = (res.first_residual <= after) & nonzero
    if bool(keep.any()):
        x[keep] = precondition(b[keep])
        after[keep] = res.first_residual[keep]
    log.passes += res.passes
    log.negative_curvature += res.negative_curvature
    log.kept_unrefined += int(keep.sum())
    log.grew += int((grew & ~keep).sum())
    log.iterations += torch.where(keep, 0, (res.steps - 1).clamp_min(0)).tolist()
    log.before += res.first_residual.tolist()
    log.after += after.tolist()
    return x
