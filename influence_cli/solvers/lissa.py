"""LiSSA solver (Agarwal et al. 2017, as Koh & Liang 2017 use it): a stochastic Neumann series.

Method: with A = H + damping I (our H already holds weight decay), the recursion

    h_0 = v,    h_j = v + h_{j-1} - A_{B_j} h_{j-1} / scale,    A^-1 v ~= h_depth / scale

converges to scale * A^-1 v iff every eigenvalue of A lies in (0, 2 scale), i.e. iff
scale > lambda_max(A) / 2, at the rate 1 - lambda_min(A) / scale per step: the depth needed grows like
scale / lambda_min, so the smallest safe scale is also the fastest. A_{B_j} v is the HVP on the
j-th minibatch B_j (uniform rows, drawn with a torch.Generator seeded from problem.seed, reseeded per
call so that ihvp is linear and batch-independent); x_j = h_j / scale is then SGD with step 1/scale on
0.5 x^T A x - v^T x, so with minibatches we return the Polyak-Ruppert mean of x_j over the last half
of the depth, which removes most of the minibatch noise that the last iterate keeps. `repeats`
independent runs are averaged. With batch_size >= n every step is the full-data HVP: the recursion is
deterministic (Richardson iteration), one run, the last iterate is returned, and a column stops once
its step h_j - h_{j-1} (= its exact residual v - A x_{j-1}) is <= tol ||v||.

`scale: auto`: lambda_max(A) by power iteration on full-data HVPs (and, with minibatches, on a few
minibatch Hessians, whose top eigenvalue is larger); scale = SAFETY * max / 2, SAFETY = 1.25, i.e.
25% above the smallest scale that converges, to cover the power-iteration underestimate and the
minibatches not probed. Divergence (NaN/inf, or ||h_j|| above DIVERGENCE_MARGIN times the bound
scale ||v|| / (damping + weight_decay) that a converging recursion with a convex loss never exceeds)
raises DataError.

The matrix (the one every solver inverts, README "Solvers"): A^-1 with A positive definite. The recursion
has no saddle-free form: on an indefinite A (where direct, cg and arnoldi apply |A|^-1) it diverges (DataError)
or leaves a large measured residual (a warning); use cg or direct there.

Cost: per solve, repeats * depth minibatch HVPs (~4 batch_size p flops each), plus one full-data HVP
pass that measures the true relative residual ||v - A x|| / ||v|| (reported; a warning above
RESIDUAL_WARN). Fit with scale auto: up to POWER_ITERS full passes, plus BATCH_PROBES x POWER_ITERS
minibatch HVPs with minibatches (each pass applies H to a block of POWER_BLOCK vectors). Self-influence of all n rows is n solves, batched k rows at a time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

from ..config import SolverConfig
from ..errors import DataError
from ..gradients import BLOCK_BYTES, GradientSource
from ..objective import Problem
from .base import Cost, Progress, require_fitted

SAFETY = 1.25  # scale = SAFETY * lambda_max / 2 with scale: auto
POWER_ITERS = 50  # power iterations for lambda_max (stops earlier once the estimate settles)
POWER_RTOL = 1e-3
POWER_BLOCK = 4  # vectors in the power-iteration block
BATCH_PROBES = 4  # minibatches whose top eigenvalue also bounds the auto scale
DIVERGENCE_MARGIN = 10.0
RESIDUAL_WARN = 0.1  # warn above this relative residual of a minibatch run
WINDOW_BYTES = 256 * 2**20  # rows held in memory to draw minibatches from
HVP_FLOPS_PER_ROW = 4.0  # x p, as direct.py counts it


class LissaSolver:
    name: ClassVar[str] = "lissa"

    def __init__(self, config: SolverConfig) -> None:
        self.config = config
        self._source: GradientSource | None = None
        self._batches: _Minibatches | None = None
        self._info: dict[str, Any] = {}
        self._residuals: list[float] = []
        self._steps: list[int] = []
        self._unconverged = 0

    @classmethod
    def estimate(cls, config: SolverConfig, n: int, p: int) -> Cost:
        c = config.lissa
        m = min(n, c.batch_size or 256)
        per_solve = (c.repeats if m < n else 1) * c.depth * HVP_FLOPS_PER_ROW * m * p
        fit = POWER_ITERS * HVP_FLOPS_PER_ROW * n * p if c.scale == "auto" else 0.0
        k = max(1, min(n, BLOCK_BYTES // (12 * p)))
        return Cost(memory_bytes=4 * 8 * p * k + WINDOW_BYTES + BLOCK_BYTES, fit_flops=fit + n * per_solve,
                    note=f"self-influence of all n rows is n solves of repeats x depth={c.depth} minibatch HVPs"
                         f" (batched {k} rows at a time; batch size {m}"
                         f"{'' if c.batch_size else ' assumed: the loader batch'})")

    def fit(self, problem: Problem, progress: Progress | None = None) -> Self:
        """Choose the minibatches and, with scale: auto, the scale (power iteration on HVPs)."""
        c = self.config.lissa
        source, batches, size = self._setup(problem)
        info: dict[str, Any] = {"name": self.name, "depth": c.depth, "batch_size": size,
                                "minibatches": batches is not None,
                                "repeats": c.repeats if batches is not None else 1,
                                "estimate": "mean of the last half of the iterates" if batches is not None
                                else "last iterate"}
        if c.scale == "auto":
            gen = torch.Generator().manual_seed(problem.seed)
            rounds = 1 + (BATCH_PROBES if batches is not None else 0)

            def tick(r: int) -> Callable[[int], None]:
                return lambda i: progress(r * POWER_ITERS + i, rounds * POWER_ITERS) if progress else None

            top = info["lambda_max"] = _top_eigenvalue(source.hvp, problem, gen, tick(0))
            if batches is not None:
                stream = batches.stream(gen)
                probes = []
                for r in range(1, rounds):
                    x, y = next(stream)
                    probes.append(_top_eigenvalue(partial(source.minibatch_hvp, x=x, y=y), problem, gen, tick(r)))
                top = max(top, *probes)
                info["lambda_max_minibatch"] = max(probes)
            info.update(scale=SAFETY * top / 2, scale_from="auto", safety=SAFETY)
        else:
            info.update(scale=float(c.scale), scale_from="config")
        if progress is not None:
            progress(1, 1)
        self._source, self._batches, self._info = source, batches, info
        self._residuals, self._steps, self._unconverged = [], [], 0
        return self

    def _setup(self, problem: Problem) -> tuple[GradientSource, _Minibatches | None, int]:
        first = next(iter(problem.train_loader))[1]
        size = min(self.config.lissa.batch_size or len(first), problem.n)
        batches = _Minibatches(problem.train_loader, size) if size < problem.n else None
        return GradientSource(problem), batches, size

    def state(self) -> dict[str, Any]:
        require_fitted(self, "_source")
        return {"info": self._info}

    def load_state(self, state: dict[str, Any], problem: Problem) -> Self:
        """The fit without its power iterations: the scale (the costly part) comes from `state`."""
        self._source, self._batches, _ = self._setup(problem)
        self._info = state["info"]
        self._residuals, self._steps, self._unconverged = [], [], 0
        return self

    def ihvp(self, v: Tensor) -> Tensor:
        """(H + damping I)^-1 v for v of shape (k, p): float64 (k, p). Raises DataError on divergence."""
        source: GradientSource = require_fitted(self, "_source")
        b = v.to(torch.float64)
        runs = self._info["repeats"]
        x = sum(self._recursion(b, self._problem_seed() + r) for r in range(runs)) / runs
        b_norm = b.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        self._residuals += ((b - source.hvp(x)).norm(dim=1) / b_norm).tolist()
        return x

    def _problem_seed(self) -> int:
        return require_fitted(self, "_source").problem.seed

    def _recursion(self, b: Tensor, seed: int) -> Tensor:
        """One LiSSA run for all k columns of b at once; returns x ~= A^-1 b. Full-data runs stop a
        column once its step h_j - h_{j-1} = b - A x_{j-1} (the exact residual) is <= tol ||b||."""
        source: GradientSource = require_fitted(self, "_source")
        problem, depth, scale = source.problem, self.config.lissa.depth, self._info["scale"]
        floor = max(problem.damping + problem.objective.weight_decay, 1e-12 * scale)
        b_norm = b.norm(dim=1)
        bound = DIVERGENCE_MARGIN * scale / floor * b_norm
        stream = self._batches.stream(torch.Generator().manual_seed(seed)) if self._batches is not None else None
        tol = self.config.lissa.tol if stream is None else 0.0
        tail_from = depth - depth // 2
        h, mean = b.clone(), torch.zeros_like(b)
        active = torch.arange(len(b), device=b.device)
        steps = torch.zeros(len(b), dtype=torch.long, device=b.device)
        for j in range(1, depth + 1):
            ha = h[active]
            ah = source.hvp(ha) if stream is None else source.minibatch_hvp(ha, *next(stream))
            step = b[active] - ah / scale
            h[active] = ha + step
            steps[active] += 1
            norms = h[active].norm(dim=1)
            finite = bool(torch.isfinite(norms).all())
            if not finite or bool((norms > bound[active]).any()):
                raise DataError(
                    f"lissa diverged at step {j} of depth {depth} with scale {scale:.4g}: ||h|| grew past"
                    f" {DIVERGENCE_MARGIN:g} x scale ||v|| / (damping + weight_decay){'' if finite else ' (NaN/inf)'}",
                    hint="raise solver.lissa.scale (it must exceed lambda_max(H + damping I) / 2; scale: auto"
                         " estimates it) or solver.damping; or use solver.name: cg")
            if stream is not None:
                if j > tail_from:
                    mean += (h - mean) / (j - tail_from)
            elif tol > 0:
                active = active[step.norm(dim=1) > tol * b_norm[active]]
                if len(active) == 0:
                    break
        if stream is None:
            self._steps += steps.tolist()
            self._unconverged += len(active) if tol > 0 else 0
        return (h if stream is None else mean) / scale

    def describe(self) -> dict[str, Any]:
        info = dict(self._info) | {"solves": len(self._residuals)}
        if self._residuals:
            info.update(residual_max=max(self._residuals), residual_median=statistics.median(self._residuals))
        if self._steps:
            info.update(steps_max=max(self._steps), steps_median=statistics.median(self._steps),
                        not_converged=self._unconverged)
        warnings = []
        if self._unconverged:
            warnings.append(f"lissa: {self._unconverged} of {len(self._residuals)} solves did not reach solver.lissa.tol="
                            f"{self.config.lissa.tol:g} in depth={self.config.lissa.depth} steps (worst relative"
                            f" residual {max(self._residuals):.3g}); raise solver.lissa.depth, or use solver.name: cg")
        elif self._residuals and self._info["minibatches"] and max(self._residuals) > RESIDUAL_WARN:
            warnings.append(f"lissa: the worst relative residual ||v - H x|| / ||v|| is {max(self._residuals):.3g}"
                            f" (> {RESIDUAL_WARN:g}): minibatch noise or too little depth; raise solver.lissa.depth,"
                            " solver.lissa.batch_size or repeats, or use solver.name: cg")
        if warnings:
            info["warnings"] = warnings
        return info


def _top_eigenvalue(apply: Callable[[Tensor], Tensor], problem: Problem, gen: torch.Generator,
                    progress: Callable[[int], None]) -> float:
    """lambda_max of the symmetric operator `apply` ((k, p) -> (k, p)) by subspace iteration on a
    block of POWER_BLOCK vectors (one data pass per iteration serves the block) with Rayleigh-Ritz,
    stopping when the top Ritz value changes by < POWER_RTOL. The Ritz value approaches lambda_max
    from below. Raises DataError if the operator shows a non-positive eigenvalue."""
    p = problem.params.size
    u = torch.linalg.qr(torch.randn(p, min(POWER_BLOCK, p), generator=gen, dtype=torch.float64))[0]
    u = u.T.contiguous().to(problem.device)
    lam = 0.0
    ritz = torch.zeros(1, dtype=torch.float64)
    for i in range(POWER_ITERS):
        w = apply(u)
        if not bool(torch.isfinite(w).all()):
            raise DataError("lissa: a Hessian-vector product is NaN/inf", hint="check the checkpoint and data")
        small = u @ w.T
        ritz, vecs = torch.linalg.eigh(0.5 * (small + small.T))
        u = torch.linalg.qr((vecs.T @ w).T)[0].T.contiguous()  # the block, rotated to Ritz order
        progress(i + 1)
        new = float(ritz[-1])
        if abs(new - lam) <= POWER_RTOL * abs(new):
            lam = new
            break
        lam = new
    if lam <= 0 or float(ritz[0]) <= 0:
        raise DataError(f"lissa: H + damping I has a non-positive eigenvalue ({float(ritz[0]):.3g}), so the"
                        " recursion cannot converge", hint="raise solver.damping or use solver.hessian: gauss_newton")
    return lam


class _Minibatches:
    """Random minibatches (x, y) of `size` distinct rows from a re-iterable loader of (idx, x, y).

    Rows are held in a window of about WINDOW_BYTES. When the whole training set fits (read once,
    kept), every minibatch is drawn uniformly from all rows, independently of the others (drawing
    epochs without replacement would correlate consecutive steps and bias the recursion). Otherwise
    consecutive windows of loader batches are read in turn (a shuffle buffer), len(window) / size
    minibatches from each; rows left at the end of a pass join the next window."""

    def __init__(self, loader: Iterable[tuple[Tensor, Tensor, Tensor]], size: int) -> None:
        self.loader, self.size = loader, size
        self._all: tuple[Tensor, Tensor] | None = None

    def stream(self, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless minibatches drawn with `gen`: each is `size` distinct rows of the current window."""
        for x, y in self._windows():
            for _ in range(max(len(x) // self.size, 1)):
                rows = torch.randperm(len(x), generator=gen)[: self.size].to(x.device)
                yield x[rows], y[rows]

    def _windows(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless windows of >= size rows; rows left over at the end of a pass join the next window."""
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        nbytes, rows, first = 0, 0, True
        while self._all is None:
            for _, x, y in self.loader:
                xs.append(x)
                ys.append(y)
                nbytes += x.element_size() * x.numel() + y.element_size() * y.numel()
                rows += len(x)
                if nbytes >= WINDOW_BYTES and rows >= self.size:
                    yield torch.cat(xs), torch.cat(ys)
                    xs, ys, nbytes, rows, first = [], [], 0, 0, False
            if first:  # the whole training set fits in one window: keep it
                self._all = torch.cat(xs), torch.cat(ys)
        while True:
            yield self._all
