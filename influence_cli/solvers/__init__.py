"""Inverse-Hessian solvers behind one interface (see base.py). `SOLVERS` is a plain registry."""

from __future__ import annotations

from torch import nn

from ..config import SolverConfig
from ..errors import ConfigError
from ..objective import Problem
from .arnoldi import ArnoldiSolver
from .base import Cost, Factored, Inverted, MemoryChecked, RowScorer, Solver, Stateful, memory_limit
from .cg import CGSolver
from .direct import DirectSolver
from .ekfac import EkfacSolver
from .lissa import LissaSolver

SOLVERS: dict[str, type] = {"direct": DirectSolver, "cg": CGSolver, "lissa": LissaSolver, "arnoldi": ArnoldiSolver,
                            "ekfac": EkfacSolver}
DIRECT_MAX_P = 20_000  # beyond this the p x p factorization (p^3/3 flops) dominates any run


def choose(config: SolverConfig, problem: Problem) -> tuple[str, str]:
    """`solver: auto`: (name, reason). direct when H fits comfortably in memory (and p <= 20k);
    else ekfac when every selected parameter sits in a Linear/Conv2d layer; else arnoldi."""
    p = problem.params.size
    need = DirectSolver.estimate(config, problem.n, p).memory_bytes
    if p <= DIRECT_MAX_P and need <= 0.5 * memory_limit(config, problem.device):
        return "direct", f"the {p}x{p} Hessian fits in memory"
    modules = dict(problem.model.named_modules())
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in problem.params.names}
    if all(isinstance(modules.get(o), (nn.Linear, nn.Conv2d)) and getattr(modules[o], "groups", 1) == 1
           for o in owners):
        return "ekfac", f"{p} parameters, all in Linear/Conv2d layers"
    return "arnoldi", f"{p} parameters, some outside Linear/Conv2d layers"


def make_solver(config: SolverConfig, problem: Problem | None = None) -> Solver:
    """The configured solver, unfitted; `auto` needs the problem to choose (see `choose`)."""
    name = config.name
    if name == "auto":
        if problem is None:
            raise ConfigError("solver.name: auto needs the loaded model to choose", hint="name a solver")
        name = choose(config, problem)[0]
    if name not in SOLVERS:
        raise ConfigError(f"solver.name: {name} is not available (available: {', '.join(SOLVERS)}, auto)")
    return SOLVERS[name](config)


__all__ = ["SOLVERS", "Cost", "Factored", "Inverted", "MemoryChecked", "RowScorer", "Solver", "Stateful", "choose", "make_solver"]
