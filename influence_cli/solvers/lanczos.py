"""|A|^-1 b for a symmetric, possibly indefinite A given only by products (`hvp`): the saddle-free inverse
(negative eigenvalues by their absolute value, tiny ones raised to a floor) that direct applies exactly when
H + damping I is not positive definite, here by the Lanczos approximation of a matrix function,

    f(A) b ~= ||b|| Q_m f(T_m) e_1,    f(t) = 1 / max(|t|, floor),    floor = FLOOR x max |Ritz value|,

with Q_m the Lanczos basis of span{b, A b, ..., A^(m-1) b} and T_m = Q_m^T A Q_m tridiagonal (for a positive
definite A this is exactly what m CG steps return). The basis is not stored: a first pass of the recurrence
builds T_m (its coefficients per column, all columns in lockstep, one `hvp` call per step on the columns still
active), a second regenerates Q_m from the stored coefficients, on the same active columns per step (the same
batches, so the same products), and sums ||b|| y_j q_j with y = f(T_m) e_1. A column stops when one more step
changes y by <= tol ||y|| (||x_j - x_(j-1)|| = ||y_j - y_(j-1)|| for an orthonormal Q) or when the recurrence
breaks down (an invariant subspace: exact). Cost: 2 m `hvp` calls at most (m <= max_iter), memory ~4 (k, p)
arrays and (k, m) coefficients. Convergence is slower than CG's on a definite matrix (1/|t| on two intervals
either side of 0), so the cg solver uses this only for the columns where CG met negative curvature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

FLOOR = 1e-10  # as direct.EIGEN_FLOOR: |eigenvalues| below FLOOR x the largest are raised to it


@dataclass
class AbsResult:
    """x (k, p) ~= |A|^-1 b; per column the Lanczos steps (k,) and whether it met the stopping test
    (`converged`, k bool); `passes` = hvp calls (both sweeps); `negative` (k,) bool: T_m had a negative Ritz value."""

    x: Tensor
    steps: Tensor
    converged: Tensor
    negative: Tensor
    passes: int


def _coefficients(alphas: Tensor, betas: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(y, has a negative Ritz value) of f(T_m) e_1 for the k tridiagonals of the first m coefficients."""
    t = torch.diag_embed(alphas[:, :m])
    if m > 1:
        t = t + torch.diag_embed(betas[:, : m - 1], 1) + torch.diag_embed(betas[:, : m - 1], -1)
    values, vectors = torch.linalg.eigh(t)
    floor = (FLOOR * values.abs().amax(dim=1, keepdim=True)).clamp_min(torch.finfo(values.dtype).tiny)
    y = (vectors * (vectors[:, 0:1, :] / values.abs().clamp_min(floor)[:, None, :])).sum(2)  # V diag(f) V^T e_1
    return y, (values < -floor).any(dim=1)


def abs_solve(hvp: Callable[[Tensor], Tensor], b: Tensor, max_iter: int, tol: float) -> AbsResult:
    """|A|^-1 b for b (k, p), A = `hvp` symmetric (see the module docstring)."""
    k, _ = b.shape
    b_norm = b.norm(dim=1)
    alphas = b.new_zeros(k, max_iter)
    betas = b.new_zeros(k, max_iter)
    steps = torch.zeros(k, dtype=torch.long, device=b.device)
    converged = b_norm == 0
    negative = torch.zeros(k, dtype=torch.bool, device=b.device)
    coeffs = b.new_zeros(k, max_iter)  # y = f(T_m) e_1 of each column, padded with zeros
    schedule: list[Tensor] = []  # the active columns of each step, for the second sweep
    q = b / b_norm.clamp_min(torch.finfo(b.dtype).tiny)[:, None]
    q_prev = torch.zeros_like(b)
    active = (~converged).nonzero().flatten()
    for j in range(max_iter):
        if len(active) == 0:
            break
        schedule.append(active)
        w = hvp(q[active])
        if j:
            w -= betas[active, j - 1][:, None] * q_prev[active]
        alpha = (q[active] * w).sum(1)
        w -= alpha[:, None] * q[active]
        beta = w.norm(dim=1)
        alphas[active, j], betas[active, j] = alpha, beta
        steps[active] += 1
        q_prev[active] = q[active]
        scale = alphas[active, : j + 1].abs().amax(dim=1) + betas[active, : j + 1].amax(dim=1)
        broke = beta <= 1e-13 * scale.clamp_min(torch.finfo(b.dtype).tiny)
        q[active] = w / beta.clamp_min(torch.finfo(b.dtype).tiny)[:, None]
        y, neg = _coefficients(alphas[active], betas[active], j + 1)
        change = (y - coeffs[active, : j + 1]).norm(dim=1)  # the previous y, padded with a zero
        done = broke | ((change <= tol * y.norm(dim=1)) if j else torch.zeros_like(broke))
        coeffs[active, : j + 1] = y
        negative[active] = neg
        converged[active[done]] = True
        active = active[~done]
    # second sweep: regenerate q_j from the stored coefficients and sum x = ||b|| sum_j y_j q_j
    x = torch.zeros_like(b)
    q = b / b_norm.clamp_min(torch.finfo(b.dtype).tiny)[:, None]
    q_prev = torch.zeros_like(b)
    passes = len(schedule)
    for j, cols in enumerate(schedule):
        x[cols] += (coeffs[cols, j] * b_norm[cols])[:, None] * q[cols]
        if j == len(schedule) - 1 or bool((steps[cols] <= j + 1).all()):
            continue
        w = hvp(q[cols])
        passes += 1
        if j:
            w -= betas[cols, j - 1][:, None] * q_prev[cols]
        w -= alphas[cols, j][:, None] * q[cols]
        q_prev[cols] = q[cols]
        q[cols] = w / betas[cols, j].clamp_min(torch.finfo(b.dtype).tiny)[:, None]
    return AbsResult(x, steps, converged, negative, passes)
