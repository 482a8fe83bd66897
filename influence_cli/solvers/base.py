"""The solver interface: fit once on a Problem, then apply A^-1 to batches of vectors, A = H + damping I.

The matrix is the same for every solver (tests/test_same_matrix.py): H is the Hessian of the training objective
(`solver.hessian`: exact, or Gauss-Newton), weight decay included; when A is not positive definite the
saddle-free |A| (eigenvalues by absolute value, floored at 1e-10 x the largest) is inverted instead: exactly by
direct, by Lanczos in cg, through |Ritz values| in arnoldi; lissa needs A positive definite, and ekfac's
factored form approximates the Gauss-Newton A (refine then moves it toward A itself, refine.py).

Solvers are built from the config (`make_solver`) and do their heavy work in `fit`, never in
`__init__`. `ihvp` maps (k, p) -> (k, p). Optional capabilities are runtime-checkable protocols, tested
with `isinstance(solver, Factored)` and the like (never by probing attributes):
  Factored       H^-1 = A^T A: `half_ihvp(v) = A v`, so self-influence g^T H^-1 g = ||A g||^2 costs no solve
  RowScorer      `self_influence_blocks(loader)` scores rows without forming p-sized gradients (ekfac)
  MemoryChecked  `check_memory(problem)` refuses, before fitting or reading a stored factor, one that cannot fit
  Stateful       `state()` / `load_state()` for the fit cache
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import torch
from torch import Tensor

from ..config import SolverConfig
from ..errors import NotFittedError
from ..objective import Problem

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Cost:
    """A solver's rough cost on a problem of n rows and p parameters, for `infl check` and `auto`."""

    memory_bytes: int
    fit_flops: float
    note: str = ""


class Solver(Protocol):
    name: ClassVar[str]

    def fit(self, problem: Problem, progress: Progress | None = None) -> Self: ...

    def ihvp(self, v: Tensor) -> Tensor: ...

    def describe(self) -> dict[str, Any]: ...

    @classmethod
    def estimate(cls, config: SolverConfig, n: int, p: int) -> Cost: ...


@runtime_checkable
class Factored(Protocol):
    def half_ihvp(self, v: Tensor) -> Tensor: ...


@runtime_checkable
class Inverted(Protocol):
    """A solver that gives A^-1 (the matrix its ihvp applies) as a dense (p, p) float64 matrix (direct)."""

    def inverse(self) -> Tensor: ...


@runtime_checkable
class RowScorer(Protocol):
    """A solver that scores training rows from one forward and one backward pass per batch, without the (B, p)
    per-example gradients: yields per batch an object with `idx` (B,), `self_influence` (B,), `losses` (B,),
    `outputs` (B, C) and `targets` (ekfac's `ScoredBlock`). `total` is for progress; `ids` name bad rows."""

    def self_influence_blocks(self, loader: Iterable[tuple[Tensor, Tensor, Tensor]], progress: Progress | None = None,
                              total: int | None = None, ids: Sequence[str] | None = None) -> Iterator[Any]: ...


@runtime_checkable
class MemoryChecked(Protocol):
    """A solver whose fitted state may not fit memory: `check_memory` raises ConfigError (naming what it needs
    and what is available) before fitting or before reading a stored factor from the cache."""

    def check_memory(self, problem: Problem) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """A solver whose fitted curvature can be stored and restored (the cache, cache.py). `state()`
    holds tensors and plain values only; `load_state` returns the solver as `fit` would have left it."""

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any], problem: Problem) -> Self: ...


def require_fitted(solver: Solver, attr: str) -> Any:
    value = getattr(solver, attr, None)
    if value is None:
        raise NotFittedError(f"solver {solver.name}: call fit() before using it")
    return value


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on `device` (MemAvailable on Linux for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_limit(config: SolverConfig, device: torch.device) -> int:
    if config.memory_limit_gb is not None:
        return int(config.memory_limit_gb * 2**30)
    return int(0.8 * available_memory(device))


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
