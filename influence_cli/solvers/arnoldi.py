"""Arnoldi solver (Schioppa et al. 2022): top eigenpairs of H from Krylov iteration on HVPs, plus
a constant for the rest of the spectrum instead of dropping it.

Method. `block_krylov` (pure; takes any symmetric `hvp` callable) runs block Arnoldi with full
reorthogonalization in float64: each pass applies H to a block of b = rank + oversample vectors in
ONE data pass (batched HVPs cost far less per vector than one-at-a-time Lanczos), projects the image on
the whole basis (Gram-Schmidt twice), and grows the basis by the orthonormalized remainder. Ritz
pairs of T = Q^T H Q are checked after each pass, and it stops when the top-`rank` residuals
||H u - theta u|| <= tol * max|theta|. The start block is b training gradients of random rows (the
directions influence is computed on, whose Ritz residuals shrink faster per pass than from a Gaussian
block), topped up with Gaussian vectors. When the basis would outgrow the memory limit it restarts from
the top-b Ritz vectors (a thick restart: exact, the Ritz vectors' images lie in the new space).

Approximation (the documented one, used by ihvp and half_ihvp), with U (r, p) the top-r Ritz
vectors by |theta| and P = U^T U:

    H^-1 ~= U^T diag(1/|theta|) U + (I - P) / c

Truncation (complement: none, what captum/pyDVL/dattri do) drops the second term; but H^-1 is
dominated by the small eigenvalues it drops. `c` (complement: rayleigh, the default) is the pooled
Rayleigh quotient of the probe gradients' complement parts r_i = (I - P) g_i:
c = sum_i r_i^T H r_i / sum_i ||r_i||^2, i.e. the curvature H has where the gradients' remainder
lives, at no extra HVP (H g_i is the first pass's image of the start block; U^T H U = diag(theta)).
It lies in [lambda_min, lambda_{r+1}]. complement: ritz uses c = min retained |theta| instead.
A trace mean of the remaining spectrum or lambda_min would be pulled down by directions no gradient
visits (softmax's null space sits at exactly weight_decay + damping): c is weighted by the gradients
instead. c is clamped to [1e-10 max|theta|, min |theta|]; negative Ritz values (an indefinite exact Hessian) are used by
absolute value, as direct does. With rank + oversample >= p the start block is the identity and all p
eigenpairs are kept: one pass of p HVPs, exact (rank is reported as p).

Refinement (`refine` = r > 0; `ihvp` only): r steps of conjugate gradients on full-data HVPs of A = H + damping
I, preconditioned by that approximation (refine.py; r + 1 HVP passes per call, all columns in each; per solve the
answer of smallest residual, and the unrefined one where A shows non-positive curvature). The
low-rank-plus-complement inverse is a deflation preconditioner: CG has only the spread of the spectrum
outside the top space left to resolve. With complement: none the preconditioner still uses c = the smallest
kept Ritz value (a truncated inverse is singular, and CG preconditioned by it never leaves the top space).
`half_ihvp` (self-influence) stays the plain approximation: a solve per row would cost HVP passes per row.

Cost: passes * b HVPs (each pass ~ 4 forward passes of b vectors over the n rows) + one
per-example gradient pass over the probe rows; memory (dim + 9b) p float64 numbers during fit
(dim = Krylov basis size; it grows in place; a pass's working blocks take ~9b rows), r p after.
ihvp: 4 k p r flops for k vectors; self-influence is ||A g||^2 with the symmetric square root
A = U^T |theta|^-1/2 U + (I - P) / sqrt(c).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

from ..config import SolverConfig
from ..errors import ConfigError
from ..gradients import GradientSource
from ..objective import Problem
from .base import Cost, Progress, gib, memory_limit, require_fitted
from .refine import RefineLog, refine

DROP = 1e-10  # new Krylov directions below DROP * max|theta| are rounding noise: not added
WORK_ROWS = 9  # working (k, p) blocks of one pass, in units of the block size b (peak memory, see Cost)
FLOOR = 1e-10  # eigenvalues and c below FLOOR * max|theta| are raised to it (as in direct)
Hvp = Callable[[Tensor], Tensor]  # (k, p) -> H (k, p), H symmetric


@dataclass(frozen=True)
class Krylov:
    """Top Ritz pairs of H from a block Krylov space.

    values (r,) Ritz values, largest |value| first; vectors (r, p) orthonormal rows with
    vectors H vectors^T = diag(values); residuals (r,) = ||H u - value u||; start_image (b, p) =
    H start from the first pass; hvps = vectors H was applied to; passes = hvp calls; dim = the
    largest basis size; restarts; converged = residuals <= tol * max|value| (or the space is R^p)."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    start_image: Tensor
    hvps: int
    passes: int
    dim: int
    restarts: int
    converged: bool


def _orthonormal_rows(block: Tensor, basis: Tensor, eps: float, limit: int) -> Tensor:
    """Orthonormal rows spanning `block` minus its part in span(basis rows): at most `limit` of
    them, directions with singular value <= eps dropped (the space stopped growing there)."""
    for _ in range(2):  # classical Gram-Schmidt twice is enough in float64
        if len(basis):
            block = block - (block @ basis.T) @ basis
    if limit <= 0 or len(block) == 0:
        return block[:0]
    _, s, vh = torch.linalg.svd(block, full_matrices=False)
    new = vh[: min(int((s > eps).sum()), limit)]
    if len(basis) and len(new):
        new = new - (new @ basis.T) @ basis
        new = torch.linalg.qr(new.T).Q.T
    return new


def block_krylov(hvp: Hvp, start: Tensor, rank: int, max_passes: int, tol: float, max_dim: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Krylov:
    """Top-`rank` eigenpairs (by |value|) of the symmetric operator `hvp` from the block Krylov
    space span{S, HS, H^2 S, ...} of the start block S (b, p), with full reorthogonalization.

    Each pass applies H to the newest block, fills that block's columns of T = Q^T H Q (block
    Arnoldi: all of Q^T H q, so T is exact even where the three-term recurrence would have lost
    orthogonality), and orthonormalizes the remainder into the next block. Residuals come free from
    the Arnoldi relation H Q = Q T + R E^T: ||H u - theta u|| = ||R^T y_last||. Stops when every
    top-`rank` residual <= tol * max|theta|, when the space is all of R^p (exact pairs), or after
    `max_passes`. If the basis would exceed `max_dim` rows (>= 2b), it restarts from the top-b
    Ritz vectors. Cost: at most max_passes * b HVPs; memory (max_dim + 2b) p."""
    b, p = start.shape
    max_dim = p if max_dim is None else min(max_dim, p)
    basis = _orthonormal_rows(start, start[:0], 1e-12 * float(start.norm(dim=1).max()), p)
    # the basis grows in place in one buffer (torch.cat would copy it each pass: twice its size at the peak);
    # pages not yet written are not resident, so reserving the most it can need costs nothing up front
    buf = start.new_empty(max(len(basis), min(max_dim, max_passes * b)), p)
    buf[: len(basis)] = basis
    basis = buf[: len(basis)]
    coeff = start @ basis.T  # start = coeff @ basis
    block, t = basis, start.new_zeros(0, 0)
    hvps = passes = restarts = dim = 0
    start_image = start
    while True:
        image = hvp(block)
        hvps, passes = hvps + len(block), passes + 1
        if passes == 1:
            start_image = coeff @ image
        cols = basis @ image.T  # (m, k): q_i^T H q_j, j in the newest block
        m, k = cols.shape
        dim, old = max(dim, m), m - k
        grown = start.new_zeros(m, m)
        grown[:old, :old] = t
        grown[:, old:] = cols
        grown[old:, :old] = cols[:old].T
        t = 0.5 * (grown + grown.T)
        rest = image - cols.T @ basis
        rest = rest - (rest @ basis.T) @ basis
        values, vecs = torch.linalg.eigh(t)
        order = values.abs().argsort(descending=True)
        top = order[: min(rank, m)]
        residuals = (rest.T @ vecs[old:, top]).norm(dim=0)
        scale = float(values.abs().max())
        if progress is not None:
            progress(passes, max_passes)
        converged = m >= p or bool((residuals <= tol * scale).all())
        if converged or passes >= max_passes:
            break
        keep = order[: min(b, m)]
        restart = m + min(b, p - m) > max_dim  # thick restart from the top-b Ritz vectors, whose
        kept = vecs[:, keep].T @ basis if restart else basis  # residuals H u - theta u span the next block
        new = _orthonormal_rows((rest.T @ vecs[old:, keep]).T if restart else rest, kept, DROP * scale,
                                min(b, p - len(kept)))
        if len(new) == 0:  # an invariant subspace: the Ritz pairs are exact
            converged = True
            break
        if restart:
            t, restarts = torch.diag(values[keep]), restarts + 1
            buf[: len(kept)] = kept  # a new tensor (Ritz vectors), so overwriting the old basis is safe
        m = len(kept)
        if m + len(new) > len(buf):  # unreachable while max_passes * b bounds the growth; a copy if ever
            buf = torch.cat([buf[:m], new])
        else:
            buf[m : m + len(new)] = new
        basis = buf[: m + len(new)]
        block = basis[m:]
    return Krylov(values[top], vecs[:, top].T @ basis, residuals, start_image, hvps, passes, dim, restarts,
                  converged)


def complement_constant(values: Tensor, vectors: Tensor, probes: Tensor, images: Tensor) -> float | None:
    """Pooled Rayleigh quotient sum r^T H r / sum ||r||^2 of r_i = (I - U^T U) g_i, for probes g (s, p)
    with images H g (s, p) and Ritz pairs (values, vectors U) satisfying U H U^T = diag(values):
    r^T H r = g^T H g - 2 (Hg)^T U^T a + a^T diag(values) a with a = U g. None when the probes have
    (numerically) no part outside span(U)."""
    a = probes @ vectors.T
    quad = (probes * images).sum() - 2 * ((images @ vectors.T) * a).sum() + (a * a * values).sum()
    norm = probes.square().sum() - a.square().sum()
    if float(norm) <= 1e-12 * float(probes.square().sum()):
        return None
    return float(quad / norm)


class ArnoldiSolver:
    name: ClassVar[str] = "arnoldi"

    def __init__(self, config: SolverConfig) -> None:
        self.config = config
        self._vectors: Tensor | None = None  # U (r, p)
        self._values: Tensor | None = None  # |theta| with floor (r,)
        self._c: float | None = None  # complement constant; None = truncation / no complement
        self._info: dict[str, Any] = {}
        self._source: GradientSource | None = None
        self._refined = RefineLog("arnoldi")

    @staticmethod
    def _sizes(config: SolverConfig, p: int) -> tuple[int, int]:
        """(rank used, block size b). When rank + oversample >= p one block spans R^p: every
        eigenpair comes out exact at the cost of p HVPs, so all p are kept and the solver is exact."""
        if config.arnoldi.rank + config.arnoldi.oversample >= p:
            return p, p
        return config.arnoldi.rank, config.arnoldi.rank + config.arnoldi.oversample

    @classmethod
    def estimate(cls, config: SolverConfig, n: int, p: int) -> Cost:
        rank, b = cls._sizes(config, p)
        passes = config.arnoldi.max_iter
        dim = min(p, passes * b)
        return Cost(memory_bytes=8 * p * (dim + WORK_ROWS * b) + 2**27,
                    fit_flops=4.0 * n * p * b * passes + 4.0 * p * dim * dim,
                    note=f"block Arnoldi, {b} HVPs per data pass, at most {passes} passes (fewer at tol); ihvp:"
                         f" {config.arnoldi.refine + 1 if config.arnoldi.refine and rank < p else 0} full-data HVP"
                         " passes per call (solver.arnoldi.refine), self-influence none")

    def fit(self, problem: Problem, progress: Progress | None = None) -> Self:
        cfg, p, device = self.config.arnoldi, problem.params.size, problem.device
        rank, b = self._sizes(self.config, p)
        limit = memory_limit(self.config, device)
        room = limit // (8 * p) - WORK_ROWS * b  # Krylov basis rows that fit beside the working blocks
        if room < min(2 * b, p):
            raise ConfigError(
                f"solver.arnoldi.rank: rank + oversample = {b} needs {gib(8 * p * (2 + WORK_ROWS) * b)} of Krylov vectors for"
                f" {p} parameters but {gib(limit)} is available",
                hint="lower solver.arnoldi.rank or solver.arnoldi.oversample, or raise solver.memory_limit_gb",
            )
        source = GradientSource(problem)
        gen = torch.Generator().manual_seed(problem.seed)
        probes = torch.empty(0, p, dtype=torch.float64, device=device)
        if b == p:
            start = torch.eye(p, dtype=torch.float64, device=device)
        else:
            if cfg.complement == "rayleigh" or cfg.start == "gradients":
                probes = _probe_gradients(source, problem, b, gen)
            noise = torch.randn(b, p, generator=gen, dtype=torch.float64).to(device)
            start = torch.cat([probes, noise])[:b] if cfg.start == "gradients" else noise
        krylov = block_krylov(source.hvp, start, rank, cfg.max_iter, cfg.tol, min(p, room), progress)
        scale = float(krylov.values.abs().max())
        floor = max(FLOOR * scale, torch.finfo(torch.float64).tiny)
        self._vectors, self._values = krylov.vectors, krylov.values.abs().clamp_min(floor)
        self._c, extra, warnings = None, 0, []
        if rank < p and cfg.complement != "none":
            smallest = float(self._values.min())
            c = None
            if cfg.complement == "rayleigh" and len(probes):
                if cfg.start == "gradients":  # H g came free with the first pass
                    images = krylov.start_image[: len(probes)]
                else:
                    images, extra = source.hvp(probes), len(probes)
                c = complement_constant(krylov.values, krylov.vectors, probes, images)
                if c is not None and c < floor:
                    warnings.append(f"the Hessian's curvature outside the top {rank} eigenvectors is {c:.3g} <= 0 along"
                                    " the training gradients (not positive definite); raise solver.damping")
            self._c = smallest if c is None else min(max(c, floor), smallest)
        if not krylov.converged:
            warnings.append(f"arnoldi did not converge in {krylov.passes} passes: largest relative Ritz residual"
                            f" {float(krylov.residuals.max()) / scale:.2g} > solver.arnoldi.tol={cfg.tol:g};"
                            " raise solver.arnoldi.max_iter")
        negative = int((krylov.values < -floor).sum())
        if negative:
            warnings.append(f"{negative} of the top Ritz values are negative (an indefinite Hessian); their absolute"
                            " values are used: raise solver.damping or use solver.hessian: gauss_newton")
        self._info = self._diagnostics(problem, krylov, rank, b, probes, extra, warnings)
        self._source, self._refined = source, RefineLog("arnoldi")
        return self

    def _diagnostics(self, problem: Problem, krylov: Krylov, rank: int, b: int, probes: Tensor, extra: int,
                     warnings: list[str]) -> dict[str, Any]:
        cfg, p = self.config.arnoldi, problem.params.size
        scale = float(krylov.values.abs().max())
        info: dict[str, Any] = {
            "p": p, "hessian": problem.hessian, "damping": problem.damping, "rank": rank, "rank_requested": cfg.rank,
            "block_size": b, "start": cfg.start if b < p else "identity", "passes": krylov.passes + (extra > 0),
            "hvps": krylov.hvps + extra, "krylov_dim": krylov.dim, "restarts": krylov.restarts,
            "converged": krylov.converged, "tol": cfg.tol, "ritz_max": float(krylov.values[0]),
            "ritz_min": float(krylov.values[-1]), "complement": cfg.complement if rank < p else "exact",
            "complement_constant": self._c, "probes": len(probes), "residual_max": float(krylov.residuals.max()),
            "residual_max_relative": float(krylov.residuals.max()) / scale if scale > 0 else 0.0,
            "ritz_values": [float(f"{v:.6g}") for v in krylov.values.tolist()],
            "residuals": [float(f"{v:.3g}") for v in krylov.residuals.tolist()],
        }
        total = float(probes.square().sum())
        if total > 0 and rank < p:  # how much of the probes' gradient energy / self-influence the top space holds
            a = probes @ krylov.vectors.T
            top = float((a.square() / self._values).sum())
            rest = (total - float(a.square().sum())) / self._c if self._c is not None else 0.0
            info["probe_gradient_energy_captured"] = float(a.square().sum()) / total
            info["probe_self_influence_from_complement"] = rest / (top + rest)
        if warnings:
            info["warnings"] = warnings
        return info

    def state(self) -> dict[str, Any]:
        return {"vectors": require_fitted(self, "_vectors"), "values": self._values, "c": self._c, "info": self._info}

    def load_state(self, state: dict[str, Any], problem: Problem) -> Self:
        self._vectors, self._values = state["vectors"].to(problem.device), state["values"].to(problem.device)
        self._c, self._info = state["c"], state["info"]
        self._source, self._refined = GradientSource(problem), RefineLog("arnoldi")
        return self

    def ihvp(self, v: Tensor) -> Tensor:
        """(H + (weight_decay + damping) I)^-1 v for v (k, p) -> (k, p) float64: `factored_ihvp` refined by
        solver.arnoldi.refine steps of CG on exact HVPs preconditioned by it (refine + 1 full-data HVP passes,
        all k columns in each; none when refine is 0 or the rank is full, where it is exact). Linear in v
        only up to each solve's remaining error; describe() reports residuals before and after."""
        vectors = require_fitted(self, "_vectors")
        if self.config.arnoldi.refine == 0 or len(vectors) >= vectors.shape[1]:  # full rank: exact already
            return self.factored_ihvp(v)
        source: GradientSource = require_fitted(self, "_source")
        b = v.to(device=vectors.device, dtype=torch.float64)
        # complement none: the truncated inverse is singular, CG preconditioned by it never leaves the top space;
        # the preconditioner then takes the smallest kept Ritz value for the rest (complement ritz)
        c = self._c if self._c is not None else float(self._values.min())
        return refine(source.hvp, lambda r: self._apply(r, c), b, self.config.arnoldi.refine, self._refined)

    def factored_ihvp(self, v: Tensor) -> Tensor:
        """U^T diag(1/|theta|) U v + (v - U^T U v) / c for v of shape (k, p); float64 result, no pass over the
        data (what `half_ihvp` squares to, and refine's preconditioner). Exact with rank >= p."""
        return self._apply(v, self._c)

    def _apply(self, v: Tensor, c: float | None, power: float = -1.0) -> Tensor:
        """U^T diag(|theta|^power) U v + c^power (v - U^T U v) (no complement term when c is None)."""
        vectors = require_fitted(self, "_vectors")
        v64 = v.to(dtype=torch.float64, device=vectors.device)
        a = v64 @ vectors.T
        out = (a * self._values.pow(power)) @ vectors
        if c is not None:
            out = out + (v64 - a @ vectors) * c**power
        return out

    def half_ihvp(self, v: Tensor) -> Tensor:
        """A v with A = U^T diag(|theta|^-1/2) U + (I - U^T U) / sqrt(c) (symmetric, A^T A = the
        approximation factored_ihvp applies), so g^T H^-1 g ~= ||A g||^2. (k, p) -> (k, p), float64."""
        return self._apply(v, self._c, -0.5)

    def describe(self) -> dict[str, Any]:
        return self._refined.describe({"name": self.name, **self._info}, self.config.arnoldi.refine)


class _Sample:
    """Re-iterable filter of a loader of (row_idx, x, y) to the rows marked in `mask` (n,)."""

    def __init__(self, loader: Any, mask: Tensor) -> None:
        self.loader, self.mask = loader, mask

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for idx, x, y in self.loader:
            keep = self.mask[idx]
            if bool(keep.any()):
                yield idx[keep], x[keep], y[keep]


def _probe_gradients(source: GradientSource, problem: Problem, count: int, gen: torch.Generator) -> Tensor:
    """Per-example gradients (s, p), float64, of s = min(count, n) training rows drawn with `gen`."""
    mask = torch.zeros(problem.n, dtype=torch.bool)
    mask[torch.randperm(problem.n, generator=gen)[:count]] = True
    parts = list(_Sample(problem.train_loader, mask))  # a few rows of many batches: one block, one vmap call
    if not parts:
        return torch.empty(0, problem.params.size, dtype=torch.float64, device=problem.device)
    rows = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))
    return torch.cat([blk.grads.to(torch.float64) for blk in source.per_example([rows])])
