"""Influence scores from gradients and a fitted solver. Pure functions, no I/O.

Sign convention (SPEC): loss_change_if_removed > 0 means removing the training row would raise the
test loss, so the row is helpful; < 0 means harmful.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .solvers import Factored, Solver


def self_influence(grads: Tensor, solver: Solver) -> Tensor:
    """g_i^T (H + damping I)^-1 g_i for each row of grads (B, p) -> (B,), float64.
    A factored solver makes it a squared norm; otherwise one batched solve."""
    if isinstance(solver, Factored):
        half = solver.half_ihvp(grads)
        return half.square().sum(dim=1)
    return (grads.to(torch.float64) * solver.ihvp(grads).to(torch.float64)).sum(dim=1)


def loss_change_if_removed(test_ihvp: Tensor, train_grads: Tensor, n: int) -> Tensor:
    """(1/n) g_t^T H^-1 g_z for test rows (T, p) already multiplied by H^-1 and train grads (B, p)
    -> (T, B). Invert the few test gradients once, stream the many training gradients."""
    return test_ihvp @ train_grads.to(test_ihvp.dtype).T / n


