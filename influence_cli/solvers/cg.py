"""Conjugate-gradient solver: (H + damping I)^-1 V by block CG on full-data Hessian-vector products.

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
CG needs A positive definite: a direction of non-positive curvature stops that column with a warning.
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
        if progress is not None:
            progress(problem.n, problem.n)
        return self

    def ihvp(self, v: Tensor) -> Tensor:
        """(H + damping I)^-1 v for v of shape (k, p), by k CG recurrences in lockstep; float64 (k, p)."""
        source: GradientSource = require_fitted(self, "_source")
        b = v.to(torch.float64)
        track = 0 if self._eig_estimate is None and len(b) > 0 and bool(b[0].any()) else None  # Lanczos on column 0
        res = pcg(source.hvp, b, self.config.cg.max_iter, self.config.cg.tol, track=track)
        if res.alphas:
            self._eig_estimate = lanczos_extremes(res.alphas, res.betas)
        self._negative_curvature += res.negative_curvature
        self._unconverged += int((res.residual > self.config.cg.tol).sum())
        x = res.x
        true_residual = (b - source.hvp(x)).norm(dim=1) / b.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        self._passes += res.passes + 1
        self._iterations += res.steps.tolist()
        self._residuals += true_residual.tolist()
        return x

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "max_iter": self.config.cg.max_iter, "tol": self.config.cg.tol,
                                "solves": len(self._iterations), "not_converged": self._unconverged,
                                "hvp_passes": self._passes}
        if self._iterations:
            info.update(iterations_max=max(self._iterations), iterations_median=statistics.median(self._iterations),
                        residual_max=max(self._residuals), residual_median=statistics.median(self._residuals))
        if self._eig_estimate is not None:
            low, high = self._eig_estimate
            info.update(eig_min_estimate=low, eig_max_estimate=high, condition_estimate=high / low)
        warnings = []
        if self._unconverged:
            warnings.append(
                f"cg: {self._unconverged} of {len(self._residuals)} solves did not reach solver.cg.tol="
                f"{self.config.cg.tol:g} in max_iter={self.config.cg.max_iter} iterations (worst relative"
                f" residual {max(self._residuals):.3g}); raise solver.cg.max_iter or solver.damping")
        if self._negative_curvature:
            warnings.append(
                f"cg: the Hessian is not positive definite ({self._negative_curvature} directions of"
                " non-positive curvature; those solves stopped early); raise solver.damping or use"
                " solver.hessian: gauss_newton")
        if warnings:
            info["warnings"] = warnings
        return info

