"""Time estimates for `infl check`, from unit costs measured on this problem and this machine in a few seconds.

Each unit is timed warm (one untimed call first: allocations, kernel selection, lazy imports), on one batch of
training rows, and scaled linearly to n:

  read_row      reading one training row from the loader (image files are decoded as they stream): every pass
                over the data pays it
  grad_row      one row's per-example gradient (`GradientSource.per_example`, reading included)
  hvp_row(k)    one row's share of a full-data HVP pass on k vectors, affine in k (timed at 1 and K vectors)
  factor(p)     eigvalsh / Cholesky of a p x p matrix, timed at min(p, 512) and scaled by p^3
  ekfac_row     one row of EK-FAC's fit passes (its real fit on one batch, minus the layers' eigendecompositions)

and each solver's fit (and the configured solver's selfcheck/rank phases) is a count of those units, following
the solver's own method (its module docstring). Counts that depend on convergence use a typical count, capped by
the solver's limit (arnoldi's block passes: TYPICAL_ARNOLDI_PASSES of max_iter; lissa's power iteration:
TYPICAL_POWER_ITERS, of at most 50). tests/test_check_estimate.py runs each phase and compares.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import SolverConfig
from .gradients import GradientSource, linear_head_hessian
from .objective import Problem
from .solvers.arnoldi import ArnoldiSolver
from .solvers.direct import CONDITION_MAX_P
from .solvers.lissa import BATCH_PROBES, POWER_BLOCK, POWER_ITERS

TYPICAL_ARNOLDI_PASSES = 7  # arnoldi reaches its tol in 3-8 block passes on the samples (max_iter 10): 7 keeps both ends within 2x
TYPICAL_POWER_ITERS = 10  # lissa stops its power iteration once lambda_max settles: 6-9 passes on the samples
K_TIMED = 32  # vectors of the second HVP timing


def _timed(fn: Callable[[], Any], repeats: int = 2) -> float:
    """Seconds of the fastest of `repeats` calls after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass
class Units:
    """Measured unit costs (seconds) of one problem on this machine; see the module docstring."""

    n: int
    p: int
    grad_row: float
    hvp_base: float  # per row: hvp_row(k) = hvp_base + hvp_vec * k
    hvp_vec: float
    batch_rows: int
    eig_p3: float  # eigvalsh seconds / p^3
    chol_p3: float
    head_row: float | None  # direct's closed-form output-layer Hessian, per row (None: not that case)
    flops: float  # float64 matmul flop/s
    read_row: float
    problem: Problem

    def hvp_pass(self, k: int, rows: int | None = None) -> float:
        """Seconds of one HVP pass on k vectors over `rows` rows (default all n, read from the loader; a given
        number of rows is a minibatch already in memory)."""
        read = self.n * self.read_row if rows is None else 0.0
        return (self.n if rows is None else rows) * (self.hvp_base + self.hvp_vec * k) + read

    def gradient_pass(self, rows: int | None = None) -> float:
        return (self.n if rows is None else rows) * self.grad_row


def measure(problem: Problem, grad_seconds: float) -> Units:
    """The unit costs of `problem` (grad_seconds: check's timed per-example-gradient pass over all n rows)."""
    source, p, n = GradientSource(problem), problem.params.size, problem.n
    batches = iter(problem.train_loader)
    _, x, y = next(batches)
    rows = len(x)
    start = time.perf_counter()
    second = next(batches, None)
    read = (time.perf_counter() - start) / len(second[0]) if second is not None else 0.0
    gen = torch.Generator().manual_seed(0)
    k = min(p, K_TIMED)
    many = torch.randn(k, p, dtype=torch.float64, generator=gen).to(problem.device)
    one_s = _timed(lambda: source.minibatch_hvp(many[:1], x, y))
    many_s = _timed(lambda: source.minibatch_hvp(many, x, y))
    vec = max(many_s - one_s, 0.0) / max(k - 1, 1)
    base = max(one_s - vec, 0.0)
    size = min(p, 512)
    spd = torch.randn(size, size, dtype=torch.float64, generator=gen)
    spd = spd @ spd.T + size * torch.eye(size, dtype=torch.float64)
    eig = _timed(lambda: torch.linalg.eigvalsh(spd)) / size**3
    chol = _timed(lambda: torch.linalg.cholesky(spd)) / size**3
    flops = 2 * size**3 / max(_timed(lambda: spd @ spd), 1e-9)
    one_batch = replace(problem, train_loader=[(torch.arange(rows), x, y)], n=rows)
    head = None
    if linear_head_hessian(GradientSource(one_batch), torch.float64, None) is not None:
        head = _timed(lambda: linear_head_hessian(GradientSource(one_batch), torch.float64, None)) / rows
    return Units(n, p, grad_seconds / max(n, 1), base / rows, vec / rows, rows, eig, chol, head, flops, read,
                 problem)


def ekfac_row(units: Units, config: SolverConfig) -> tuple[float, float]:
    """(seconds per row of EK-FAC's fit passes, seconds of its eigendecompositions): its real fit on one batch,
    timed warm, minus the eigendecompositions of random factors of its layers' shapes."""
    from .solvers.ekfac import EkfacSolver

    problem = units.problem
    _, x, y = next(iter(problem.train_loader))
    one_batch = replace(problem, train_loader=[(torch.arange(len(x)), x, y)], n=len(x))
    fitted = EkfacSolver(config).fit(one_batch)
    shapes = [(layer["out"], layer["in"]) for layer in fitted.describe()["layers"]]
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(d, d, dtype=torch.float64, generator=gen) for shape in shapes for d in shape]
    mats = [m @ m.T for m in mats]
    eig = _timed(lambda: [torch.linalg.eigh(m) for m in mats])
    total = _timed(lambda: EkfacSolver(config).fit(one_batch))
    passes = 2 if config.ekfac.correct_eigenvalues else 1
    return max(total - eig, 0.0) / len(x) + passes * units.read_row, eig


def fit_seconds(name: str, config: SolverConfig, units: Units) -> float:
    """Estimated seconds of solver `name`'s fit on the whole problem (see the module docstring)."""
    n, p = units.n, units.p
    if name == "direct":
        dense = (units.head_row + units.read_row) * n if units.head_row is not None else units.hvp_pass(p)
        return dense + (units.eig_p3 * p**3 if p <= CONDITION_MAX_P else 0.0) + units.chol_p3 * p**3
    if name == "cg":
        return 0.0
    if name == "lissa":
        if config.lissa.scale != "auto":
            return 0.0
        batch = min(config.lissa.batch_size or units.batch_rows, n)
        probes = BATCH_PROBES * TYPICAL_POWER_ITERS * units.hvp_pass(POWER_BLOCK, batch) if batch < n else 0.0
        return min(TYPICAL_POWER_ITERS, POWER_ITERS) * units.hvp_pass(POWER_BLOCK) + probes
    if name == "arnoldi":
        rank, b = ArnoldiSolver._sizes(config, p)
        if b >= p:
            return units.hvp_pass(p)
        passes = min(config.arnoldi.max_iter, TYPICAL_ARNOLDI_PASSES)
        dim = min(p, passes * b)
        orth = 4.0 * p * dim * b * passes / units.flops  # Gram-Schmidt twice against a basis growing to dim rows
        return units.gradient_pass(b) + passes * units.hvp_pass(b) + orth
    if name == "ekfac":
        per_row, eig = ekfac_row(units, config)
        return per_row * n + eig
    raise ValueError(name)


def solve_passes(name: str, config: SolverConfig, p: int) -> int:
    """Full-data HVP passes of one ihvp call (all test rows at once): refine + 1 for ekfac/arnoldi, up to
    max_iter + 1 for cg, 1 (the residual check) for lissa; 0 for direct."""
    if name in ("ekfac", "arnoldi"):
        steps = getattr(config, name).refine
        if name == "arnoldi" and ArnoldiSolver._sizes(config, p)[1] >= p:
            return 0
        return steps + 1 if steps else 0
    if name == "cg":
        return config.cg.max_iter + 1
    return 1 if name == "lissa" else 0


def solve_seconds(name: str, config: SolverConfig, units: Units, k: int) -> float:
    """Estimated seconds of one ihvp call on k test vectors."""
    seconds = solve_passes(name, config, units.p) * units.hvp_pass(k)
    if name == "lissa":
        batch = min(config.lissa.batch_size or units.batch_rows, units.n)
        repeats = config.lissa.repeats if batch < units.n else 1
        seconds += repeats * config.lissa.depth * units.hvp_pass(k, batch)
    return seconds
