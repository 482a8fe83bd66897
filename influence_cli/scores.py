"""Influence scores from gradients and a fitted solver. Pure functions, no I/O.

Sign convention (SPEC): loss_change_if_removed > 0 means removing the training row would raise the
test loss, so the row is helpful; < 0 means harmful.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .config import SelfcheckConfig
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


def flag_rows(self_influence: np.ndarray, mismatch: np.ndarray | None, config: SelfcheckConfig) -> np.ndarray:
    """Which rows `selfcheck` flags (bool (n,)).

    Default rule: a robust z-score of log(self_influence), z = (log s - median) / (1.4826 * MAD),
    above `flag_threshold` (default 2.0: a conservative cut, ~1% of rows of a clean dataset). With `flag_fraction`, exactly the
    top ceil(fraction * n) rows instead. With `flag_requires_mismatch`, only rows whose given label
    the model does not predict (classification/binary) stay flagged."""
    n = len(self_influence)
    if config.flag_fraction is not None:
        count = math.ceil(config.flag_fraction * n)
        order = np.lexsort((np.arange(n), -self_influence))
        flagged = np.zeros(n, dtype=bool)
        flagged[order[:count]] = True
    else:
        z = robust_z(np.log(np.maximum(self_influence, np.finfo(np.float64).tiny)))
        flagged = z > config.flag_threshold
    if config.flag_requires_mismatch and mismatch is not None:
        flagged &= mismatch
    return flagged


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD); falls back to the mean absolute deviation when MAD is 0."""
    center = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - center))
    if spread == 0:
        spread = 1.2533 * np.mean(np.abs(values - center))
    if spread == 0:
        return np.zeros_like(values)
    return (values - center) / spread
