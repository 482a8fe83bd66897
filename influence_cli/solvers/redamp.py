"""A fitted solver at another damping without refitting its curvature, where that is exact.

direct (Cholesky form): H + d' I = L L^T + (d' - d) I, refactored in O(p^3) with no pass over the
data (forming H costs p Hessian-vector products over every row). Other solvers, and direct in its
eigen (saddle-free) form, whose stored eigenvalues are already clipped, return None: refit them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..objective import Problem
from .base import Solver
from .direct import DirectSolver


def redamped(solver: Solver, damping: float, problem: Problem) -> Solver | None:
    """`solver` (fitted at problem's old damping `solver.describe()['damping']`) at `damping`, or None."""
    if not isinstance(solver, DirectSolver):
        return None
    state = solver.state()
    old = float(state["info"].get("damping", problem.damping))
    if state["chol"] is None:
        return None
    chol = state["chol"]
    hess = chol @ chol.T
    hess.diagonal().add_(damping - old)
    factor, info = torch.linalg.cholesky_ex(hess)
    if int(info) != 0:
        return None
    shifted = dict(state["info"], damping=damping)
    for key in ("eig_min", "eig_max"):
        if key in shifted:
            shifted[key] = shifted[key] + damping - old
    if "eig_min" in shifted and "eig_max" in shifted:
        shifted["condition_number"] = abs(shifted["eig_max"]) / max(abs(shifted["eig_min"]), 1e-300)
    return DirectSolver(replace(solver.config, damping=damping)).load_state({**state, "chol": factor, "info": shifted}, problem)
