"""Conjugate-gradient solver: A^-1 V, A = H + damping I (H per `solver.hessian`, weight decay included), by block CG
on full-data Hessian-vector products; where A is not positive definite, the saddle-free |A|^-1 (as direct).

Method: k independent CG recurrences (one per right-hand side) run in lockstep (pcg.py with M = I), so that
each iteration costs ONE pass over the training rows (`GradientSource.hvp` applies H to all k vectors
in that pass). A column stops once its relative residual ||v - A x|| / ||v|| <= tol (A = H + damping I)
and is dropped from later passes. Float64 throughout. There is no fit-time factorization: `fit`
only stores the problem; all work happens in `ihvp`, which ends with one more pass to measure the
true residual of every column. The Lanczos tridiagonal that CG builds on the way gives estimates of
the extreme eigenvalues of A for free (reported as diagnostics).

Cost: per solve, `iterations` (<= max_iter) HVP passes, each ~4 n p flops per vector; memory
~5 (k, p) float64 arrays. Self-influence of all n training rows is n solves, batched k rows per
pass: ~4 n^2 p iterations flops. A test row's influence on every training row is one solve.
The matrix, the same for every solver (README "Solvers"): A^-1 when A is positive definite; otherwise |A|^-1,
negative eigenvalues by their absolute value and tiny ones raised to 1e-10 x the largest, what direct applies
exactly. CG itself needs A positive definite: a column whose CG meets a direction of non-positive curvature is
solved again from scratch by the Lanczos approximation of |A|^-1 b (lanczos.py: up to 2 max_iter more passes, for
those columns only; a warning says how many). Stopping CG there, as this solver once did, left those columns
after a few steps far from any inverse (Spearman 0.23 with direct on a digits MLP with an indefinite H).
"""

from __future__ import annotations

import statistics
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

from ..config import SolverConfig
from ..gradients import BLOCK_BYTES, GradientSource
from ..objective import Problem
from .base import Cost, Progress, require_fitted
from .lanczos import abs_solve
from .pcg import lanczos_extremes, pcg

HVP_FLOPS_PER_ROW = 4.0  # x p: one Hessian-vector product on one row (as direct.py counts it)


class CGSolver:
    name: ClassVar[str] = "cg"

    def __init__(self, config: SolverConfig) -> None:
        self.config = config
        self._source: GradientSource | None = None
        self._iterations: list[int] = []
        self._residuals: list[float] = []
        self._negative_curvature = 0
        self._saddle_free = 0
        self._unconverged = 0
        self._passes = 0
        self._eig_estimate: tuple[float, float] | None = None

    @classmethod
    def estimate(cls, config: SolverConfig, n: int, p: int) -> Cost:
        k = max(1, min(n, BLOCK_BYTES // (12 * p)))  # right-hand sides per block, as per-example grads stream
        per_solve = config.cg.max_iter * HVP_FLOPS_PER_ROW * n * p
        return Cost(memory_bytes=5 * 8 * p * k + BLOCK_BYTES, fit_flops=n * per_solve,
                    note=f"no factorization: self-influence of all n rows is n CG solves of up to"
                         f" max_iter={config.cg.max_iter} data passes (batched {k} rows per pass);"
                         " one solve per test row for rank")

    def fit(self, problem: Problem, progress: Progress | None = None) -> Self:
        """Store the problem. CG has nothing to factor; diagnostics restart here."""
        self._source = GradientSource(problem)
        self._iterations, self._residuals = [], []
        self._negative_curvature, self._unconverged, self._passes, self._eig_estimate = 0, 0, 0, None
        self._saddle_free = 0
        if progress is not None:
            progress(problem.n, problem.n)
        return self

    def ihvp(self, v: Tensor) -> Tensor:
        """A^-1 v for v of shape (k, p), by k CG recurrences in lockstep; columns that meet non-positive curvature
        get |A|^-1 v from lanczos.abs_solve instead (see the module docstring); float64 (k, p)."""
        source: GradientSource = require_fitted(self, "_source")
        b = v.to(torch.float64)
        cfg = self.config.cg
        track = 0 if self._eig_estimate is None and len(b) > 0 and bool(b[0].any()) else None  # Lanczos on column 0
        res = pcg(source.hvp, b, cfg.max_iter, cfg.tol, track=track)
        if res.alphas:
            self._eig_estimate = lanczos_extremes(res.alphas, res.betas)
        self._negative_curvature += res.negative_curvature
        x, passes, indefinite = res.x, res.passes, res.negative
        definite = ~indefinite
        if bool(indefinite.any()):
            saddle = abs_solve(source.hvp, b[indefinite], cfg.max_iter, cfg.tol)
            x[indefinite] = saddle.x
            passes += saddle.passes
            self._saddle_free += int(indefinite.sum())
            self._unconverged += int((~saddle.converged).sum())
            self._iterations += saddle.steps.tolist()
        self._unconverged += int((res.residual[definite] > cfg.tol).sum())
        self._iterations += res.steps[definite].tolist()
        if bool(definite.any()):  # |A| has no products to measure |A| x - v with: the saddle-free columns have none
            xd, bd = x[definite], b[definite]
            true_residual = (bd - source.hvp(xd)).norm(dim=1) / bd.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
            self._residuals += true_residual.tolist()
            passes += 1
        self._passes += passes
        return x

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "max_iter": self.config.cg.max_iter, "tol": self.config.cg.tol,
                                "matrix": "A^-1 (A = H + damping I); |A|^-1 where A is not positive definite",
                                "solves": len(self._iterations), "not_converged": self._unconverged,
                                "saddle_free_solves": self._saddle_free, "hvp_passes": self._passes}
        if self._iterations:
            info.update(iterations_max=max(self._iterations), iterations_median=statistics.median(self._iterations))
        if self._residuals:
            info.update(residual_max=max(self._residuals), residual_median=statistics.median(self._residuals))
        if self._eig_estimate is not None:
            low, high = self._eig_estimate
            info.update(eig_min_estimate=low, eig_max_estimate=high, condition_estimate=high / low)
        warnings = []
        if self._unconverged:
            worst = f" (worst relative residual {max(self._residuals):.3g})" if self._residuals else ""
            warnings.append(
                f"cg: {self._unconverged} of {len(self._iterations)} solves did not reach solver.cg.tol="
                f"{self.config.cg.tol:g} in max_iter={self.config.cg.max_iter} iterations{worst}; raise"
                " solver.cg.max_iter or solver.damping")
        if self._negative_curvature:
            warnings.append(
                f"cg: the Hessian is not positive definite ({self._negative_curvature} directions of non-positive"
                f" curvature): {self._saddle_free} solves used the saddle-free |H + damping I|^-1 by Lanczos, as"
                " direct does; raise solver.damping or use solver.hessian: gauss_newton")
        if warnings:
            info["warnings"] = warnings
        return info

