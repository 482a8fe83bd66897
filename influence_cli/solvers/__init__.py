"""Inverse-Hessian solvers behind one interface (see base.py). `SOLVERS` is a plain registry."""

from __future__ import annotations

from ..config import SolverConfig
from ..errors import ConfigError
from .arnoldi import ArnoldiSolver
from .base import Cost, Factored, Solver
from .cg import CGSolver
from .direct import DirectSolver
from .ekfac import EkfacSolver
from .lissa import LissaSolver

SOLVERS: dict[str, type] = {"direct": DirectSolver, "arnoldi": ArnoldiSolver, "cg": CGSolver, "lissa": LissaSolver, "ekfac": EkfacSolver}


def make_solver(config: SolverConfig) -> Solver:
    """The configured solver, unfitted. `auto` picks direct (the only solver in this version)."""
    name = "direct" if config.name == "auto" else config.name
    if name not in SOLVERS:
        raise ConfigError(
            f"solver.name: {name} is not available in this version (available: {', '.join(SOLVERS)})",
            hint="use solver.name: direct, with params: last_layer for large models",
        )
    return SOLVERS[name](config)


__all__ = ["SOLVERS", "Cost", "Factored", "Solver", "make_solver"]
