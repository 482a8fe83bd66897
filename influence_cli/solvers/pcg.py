"""Block preconditioned conjugate gradients: the one CG loop, behind the cg solver (M = I) and the refinement of
ekfac and arnoldi (M = their own approximate inverse, refine.py).

k independent recurrences for A x = b (one per row of b) run in lockstep, so each step costs ONE call of `hvp` on
the columns still active. From x = 0 the first direction is M b; after j steps x minimizes the A-norm error over
span{M b, (M A) M b, ..., (M A)^(j-1) M b}. A column stops when its relative residual ||r|| / ||b|| <= tol, or on a
direction of non-positive curvature d^T A d <= 0 (A is not positive definite there: x keeps its value). Residuals
are the recurrence's (b - A x in exact arithmetic; no extra `hvp` call measures them). With `best`, each column's
iterate of smallest residual is kept too (`best_x`; refine.py: on an indefinite A the residual can grow, and CG's
A-norm error, which it minimizes, is a norm only for a positive definite A). The step
sizes of one column are the Lanczos coefficients of M A, whose extreme eigenvalues `lanczos_extremes` estimates.
Cost: `max_iter` `hvp` calls and `max_iter` + 1 `precondition` calls at most; memory ~5 (k, p) arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PCGResult:
    """x (k, p); per column the CG steps taken (k,) and the relative residual ||r|| / ||b|| (k,) of x and
    `first_residual` (k,) of the first direction itself, ||b - A M b|| / ||b|| (0 for b = 0, 1 for a column never
    stepped); `stalled` (k,) bool: columns stopped by non-positive curvature at their first step (x = 0 there);
    `hvp` calls (`passes`), directions of non-positive curvature met, and the tracked column's step sizes
    (`alphas`, `betas`, for `lanczos_extremes`; they end where that column met non-positive curvature).
    `negative` (k,) bool: columns that met non-positive curvature (at any step). With `best`: `best_x` (k, p)
    and `best_residual` (k,), each column's iterate of smallest residual (inf where it took no step), and `grew`
    (k,) bool, the columns whose last iterate is not that one."""

    x: Tensor
    steps: Tensor
    residual: Tensor
    first_residual: Tensor
    stalled: Tensor
    passes: int = 0
    negative_curvature: int = 0
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    grew: Tensor | None = None
    negative: Tensor | None = None
    best_x: Tensor | None = None
    best_residual: Tensor | None = None


def pcg(hvp: Callable[[Tensor], Tensor], b: Tensor, max_iter: int, tol: float,
        precondition: Callable[[Tensor], Tensor] | None = None, track: int | None = None,
        best: bool = False) -> PCGResult:
    """Solve A x = b, A = `hvp` (symmetric, positive definite expected), M = `precondition` (identity when None),
    b (k, p), by at most `max_iter` steps per column from x = 0; `track` names a column whose step sizes are kept;
    `best` also keeps each column's iterate of smallest residual (see the module docstring)."""
    apply_m = precondition if precondition is not None else torch.clone  # d is updated in place: never b itself
    tiny = torch.finfo(b.dtype).tiny
    b_norm = b.norm(dim=1)
    x, r = torch.zeros_like(b), b.clone()
    d = apply_m(b)  # z_0 = M r_0 = M b
    rz = (r * d).sum(1)
    res = PCGResult(x, torch.zeros(len(b), dtype=torch.long, device=b.device), b_norm.new_zeros(len(b)),
                    (b_norm > 0).to(b.dtype), torch.zeros(len(b), dtype=torch.bool, device=b.device))
    res.negative = torch.zeros(len(b), dtype=torch.bool, device=b.device)
    active = (b_norm > 0).nonzero().flatten()
    best_x = torch.zeros_like(b) if best else None
    best_res = torch.where(b_norm > 0, torch.inf, 0.0).to(b.dtype)  # x = 0 is no candidate: the first step is
    for step in range(max_iter):
        active = active[r[active].norm(dim=1) > tol * b_norm[active]]
        if len(active) == 0:
            break
        ad = hvp(d[active])
        res.passes += 1
        curvature = (d[active] * ad).sum(1)
        ok = curvature > 0
        if step == 0:
            res.first_residual[active] = (b[active] - ad).norm(dim=1) / b_norm[active]
            res.stalled[active[~ok]] = True
        if not bool(ok.all()):  # not positive definite along d: those columns stop where they are
            res.negative_curvature += int((~ok).sum())
            res.negative[active[~ok]] = True
            if track is not None and bool((active[~ok] == track).any()):
                track = None
            active, ad, curvature = active[ok], ad[ok], curvature[ok]
            if len(active) == 0:
                break
        alpha = rz[active] / curvature
        x[active] += alpha[:, None] * d[active]
        r[active] -= alpha[:, None] * ad
        res.steps[active] += 1
        if best_x is not None:
            now = r[active].norm(dim=1) / b_norm[active]
            better = now < best_res[active]
            best_x[active[better]] = x[active[better]]
            best_res[active[better]] = now[better]
        beta = None
        if step < max_iter - 1:  # the last step needs no new direction
            z = apply_m(r[active])
            rz_new = (r[active] * z).sum(1)
            beta = rz_new / rz[active]
            d[active] = z + beta[:, None] * d[active]
            rz[active] = rz_new
        if track is not None:
            at = (active == track).nonzero()
            if len(at):
                res.alphas.append(float(alpha[at[0, 0]]))
                if beta is not None:
                    res.betas.append(float(beta[at[0, 0]]))
    res.residual = r.norm(dim=1) / b_norm.clamp_min(tiny)
    if best_x is not None:
        res.grew = res.residual > best_res
        res.best_x, res.best_residual = best_x, best_res
    return res


def lanczos_extremes(alphas: list[float], betas: list[float]) -> tuple[float, float]:
    """(smallest, largest) eigenvalue of the Lanczos tridiagonal built from CG's step sizes (m alphas, at least
    m - 1 betas): Ritz values of M A that approach its extreme eigenvalues as CG converges (the smallest from
    above)."""
    m = len(alphas)
    diag = torch.tensor([1 / alphas[i] + (betas[i - 1] / alphas[i - 1] if i else 0.0) for i in range(m)],
                        dtype=torch.float64)
    off = torch.tensor([betas[i] ** 0.5 / alphas[i] for i in range(m - 1)], dtype=torch.float64)
    values = torch.linalg.eigvalsh(torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1))
    return float(values[0]), float(values[-1])
