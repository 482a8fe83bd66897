"""The solver interface: fit once on a Problem, then apply (H + damping I)^-1 to batches of vectors.

Solvers are built from the config (`make_solver`) and do their heavy work in `fit`, never in
`__init__`. `ihvp` maps (k, p) -> (k, p). Solvers that factor H^-1 = A^T A also offer
`half_ihvp(v) = A v`, so self-influence g^T H^-1 g = ||A g||^2 costs no solve per row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
class Stateful(Protocol):
    """A solver whose fitted curvature can be stored and restored (the cache, cache.py). `state()`
    holds tensors and plain values only; `load_state` returns the solver as `fit` would have left it."""

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any], problem: Problem) -> Self: ...


def require_fitted(solver: Any, attr: str) -> Any:
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
