"""Conjugate-gradient solver: (H + damping I)^-1 V by block CG on full-data Hessian-vector products.

Method: k independent CG recurrences (one per right-hand side) run in lockstep, so that each
iteration costs ONE pass over the training rows (`GradientSource.hvp` applies H to all k vectors
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
        k = b.shape[0]
        x = torch.zeros_like(b)
        r = b.clone()
        d = r.clone()
        b_norm = b.norm(dim=1)
        rs = r.square().sum(1)
        iterations = torch.zeros(k, dtype=torch.long, device=b.device)
        active = (b_norm > 0).nonzero().flatten()
        tol, max_iter = self.config.cg.tol, self.config.cg.max_iter
        alphas: list[float] = []
        betas: list[float] = []
        track = 0 if self._eig_estimate is None and k > 0 and b_norm[0] > 0 else None  # Lanczos on column 0
        for _ in range(max_iter):
            active = active[rs[active].sqrt() > tol * b_norm[active]]
            if len(active) == 0:
                break
            ad = source.hvp(d[active])
            self._passes += 1
            curvature = (d[active] * ad).sum(1)
            bad = curvature <= 0
            if bool(bad.any()):  # not positive definite along d: stop those columns where they are
                self._negative_curvature += int(bad.sum())
                if track is not None and bool((active[bad] == track).any()):
                    track = None
                keep = ~bad
                active, ad, curvature = active[keep], ad[keep], curvature[keep]
                if len(active) == 0:
                    break
            alpha = rs[active] / curvature
            x[active] += alpha[:, None] * d[active]
            r[active] -= alpha[:, None] * ad
            rs_new = r[active].square().sum(1)
            beta = rs_new / rs[active]
            d[active] = r[active] + beta[:, None] * d[active]
            rs[active] = rs_new
            iterations[active] += 1
            if track is not None:
                at = (active == track).nonzero()
                if len(at):
                    alphas.append(float(alpha[at[0, 0]]))
                    betas.append(float(beta[at[0, 0]]))
        if alphas:
            self._eig_estimate = _lanczos_extremes(alphas, betas)
        self._unconverged += int((rs.sqrt() > tol * b_norm).sum())
        true_residual = (b - source.hvp(x)).norm(dim=1) / b_norm.clamp_min(torch.finfo(torch.float64).tiny)
        self._passes += 1
        self._iterations += iterations.tolist()
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


def _lanczos_extremes(alphas: list[float], betas: list[float]) -> tuple[float, float]:
    """(smallest, largest) eigenvalue of the Lanczos tridiagonal built from CG's step sizes: Ritz
    values that approach A's extreme eigenvalues as CG converges (the smallest from above)."""
    m = len(alphas)
    diag = torch.tensor([1 / alphas[i] + (betas[i - 1] / alphas[i - 1] if i else 0.0) for i in range(m)],
                        dtype=torch.float64)
    off = torch.tensor([betas[i] ** 0.5 / alphas[i] for i in range(m - 1)], dtype=torch.float64)
    values = torch.linalg.eigvalsh(torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1))
    return float(values[0]), float(values[-1])
