"""Direct solver: the exact (p, p) Hessian in float64, factored once.

Method: H + damping I is formed as the HVPs of all p basis vectors, in blocks, in one pass over the data
(`GradientSource.dense_hessian`: reverse-over-reverse for the exact Hessian, J^T Lambda J for Gauss-Newton; in
closed form, one (n, p) product, when the selected parameters are exactly the output Linear layer; cost
~ n p^2, memory 8 p^2 bytes), then Cholesky-factored in place, L L^T = H.
Self-influence is ||L^-1 g||^2 (a triangular solve per batch of rows, no per-row solve) and
H^-1 v = cholesky_solve; `inverse()` gives H^-1 itself (~p^3) for callers with many structured vectors.
If H is not positive definite (a non-convex model, little damping), it is
eigendecomposed instead: negative eigenvalues are replaced by their absolute value (the saddle-free
convention) and tiny ones raised to a floor of 1e-10 * max |eigenvalue|; both counts are reported.
That is the matrix every solver inverts (README "Solvers", tests/test_same_matrix.py): A^-1, A = H + damping I,
when A is positive definite, else |A|^-1 (cg by Lanczos, arnoldi by its Ritz values' absolute values).
A Hessian with NaN/inf entries (a diverged checkpoint), or one whose factorization fails or overflows, is a
DataError naming the parameters, not a torch error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeVar

import torch
from torch import Tensor

from ..config import SolverConfig
from ..errors import ConfigError, DataError, NotFittedError
from ..gradients import GradientSource
from ..objective import Problem
from .base import Cost, Progress, gib, memory_limit, require_fitted

EIGEN_FLOOR = 1e-10
CONDITION_MAX_P = 6000  # eigenvalues for the condition number only up to this size (they cost ~p^3)
T = TypeVar("T")


class DirectSolver:
    name: ClassVar[str] = "direct"

    def __init__(self, config: SolverConfig) -> None:
        self.config = config
        self._chol: Tensor | None = None  # lower-triangular L, or None in eigen mode
        self._eig: tuple[Tensor, Tensor] | None = None  # (eigenvalues used, eigenvectors)
        self._info: dict[str, Any] = {}

    @classmethod
    def estimate(cls, config: SolverConfig, n: int, p: int) -> Cost:
        return Cost(memory_bytes=8 * p * p + 2**27, fit_flops=4.0 * n * p * p + p**3 / 3,
                    note="exact Hessian, float64")

    def check_memory(self, problem: Problem) -> None:
        """ConfigError when the p x p factor does not fit solver.memory_limit_gb (before fitting or reading one)."""
        p = problem.params.size
        need = self.estimate(self.config, problem.n, p).memory_bytes
        limit = memory_limit(self.config, problem.device)
        if need > limit:
            raise ConfigError(
                f"solver.name: direct needs {gib(need)} for the {p}x{p} Hessian but {gib(limit)} is available",
                hint="use params: last_layer, a solver for large models, or raise solver.memory_limit_gb",
            )

    def fit(self, problem: Problem, progress: Progress | None = None) -> Self:
        self.check_memory(problem)
        p = problem.params.size
        source = GradientSource(problem)
        hess = source.dense_hessian(torch.float64, progress)
        check_hessian(hess, problem)
        self._info = {"p": p, "hessian": problem.hessian, "damping": problem.damping}
        if p <= CONDITION_MAX_P:
            eig = _linalg(torch.linalg.eigvalsh, hess)
            self._info.update(eig_min=float(eig[0]), eig_max=float(eig[-1]),
                              condition_number=float(eig[-1].abs() / eig.abs().min().clamp_min(1e-300)))
        _, info = torch.linalg.cholesky_ex(hess, out=(hess, torch.empty((), dtype=torch.int32, device=hess.device)))
        if int(info) == 0 and bool(torch.isfinite(hess.diagonal()).all()):
            self._chol, self._eig = hess, None
            self._info["factorization"] = "cholesky"
            return self
        del hess  # the failed in-place factorization destroyed it: form it again
        hess = source.dense_hessian(torch.float64, progress)
        values, vectors = _linalg(torch.linalg.eigh, hess)
        del hess
        floor = EIGEN_FLOOR * float(values.abs().max())
        negative = int((values < -floor).sum())
        tiny = int((values.abs() < floor).sum())
        used = values.abs().clamp_min(floor)
        self._chol, self._eig = None, (used, vectors)
        self._info.update(factorization="eigen", negative_eigenvalues=negative, tiny_eigenvalues=tiny,
                          eigen_floor=floor, eig_min=float(values[0]), eig_max=float(values[-1]))
        self._info["warnings"] = [
            f"the Hessian is not positive definite: {negative} negative eigenvalues (used their absolute"
            f" value) and {tiny} below {floor:.3g} (raised to it); raise solver.damping or use"
            " solver.hessian: gauss_newton for a positive-definite curvature"
        ]
        return self

    def state(self) -> dict[str, Any]:
        if self._chol is None and self._eig is None:
            raise NotFittedError(f"solver {self.name}: call fit() before state()")
        eig = self._eig or (None, None)
        return {"chol": self._chol, "eig_values": eig[0], "eig_vectors": eig[1],
                "info": self._info}

    def load_state(self, state: dict[str, Any], problem: Problem) -> Self:
        self.check_memory(problem)  # the stored factor is as large as a fitted one
        device = problem.device
        self._chol = None if state["chol"] is None else state["chol"].to(device)
        self._eig = (None if state["eig_values"] is None
                     else (state["eig_values"].to(device), state["eig_vectors"].to(device)))
        self._info = state["info"]
        return self

    def ihvp(self, v: Tensor) -> Tensor:
        """(H + damping I)^-1 v for v of shape (k, p); float64 result."""
        v64 = v.to(torch.float64)
        if self._eig is not None:
            values, vectors = self._eig
            return ((v64 @ vectors) / values) @ vectors.T
        chol = require_fitted(self, "_chol")
        return torch.cholesky_solve(v64.T, chol).T

    def half_ihvp(self, v: Tensor) -> Tensor:
        """A v with A^T A = (H + damping I)^-1, so g^T H^-1 g = ||A g||^2. (k, p) -> (k, p), float64."""
        v64 = v.to(torch.float64)
        if self._eig is not None:
            values, vectors = self._eig
            return (v64 @ vectors) * values.rsqrt()
        chol = require_fitted(self, "_chol")
        return torch.linalg.solve_triangular(chol, v64.T, upper=False).T

    def inverse(self) -> Tensor:
        """(H + damping I)^-1 (|A|^-1 in eigen mode) as a dense symmetric (p, p) float64 matrix: the matrix
        `ihvp` applies, for callers that apply it to many structured vectors at once (signals.loo_loss on an
        output Linear layer). Cost ~p^3 flops, memory 8 p^2 bytes besides the factor."""
        if self._eig is not None:
            values, vectors = self._eig
            inv = (vectors / values) @ vectors.T
        else:
            inv = torch.cholesky_inverse(require_fitted(self, "_chol"))
        return 0.5 * (inv + inv.T)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self._info}


def check_hessian(hess: Tensor, problem: Problem) -> None:
    """DataError naming the parameters whose rows of the dense Hessian are NaN/inf (and the checkpoint's weights
    that are, if any), before a factorization turns them into NaN scores or a LinAlgError."""
    finite = torch.isfinite(hess)
    if bool(finite.all()):
        return
    rows = (~finite).any(dim=1).cpu()
    space, bad, start = problem.params, [], 0
    for name, shape in zip(space.names, space.shapes, strict=True):
        if bool(rows[start : start + shape.numel()].any()):
            bad.append(name)
        start += shape.numel()
    weights = [n for n, t in space.values(problem.model).items() if not bool(torch.isfinite(t).all())]
    cause = (f"the checkpoint has NaN/inf weights in {', '.join(weights[:5])}" if weights
             else "the checkpoint's weights or the training features overflow in float64")
    raise DataError(f"the Hessian has non-finite entries ({int((~finite).sum())} of {hess.shape[0]}x{hess.shape[1]},"
                    f" in the rows of {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}): {cause}",
                    hint="check that the checkpoint is not diverged (retrain it with a smaller learning rate) and that"
                         " the training features are finite and of moderate size")


def _linalg(op: Callable[[Tensor], T], hess: Tensor) -> T:
    """`op(hess)`, with torch's LinAlgError and overflowing (non-finite) eigenvalues as a DataError naming the
    Hessian's largest entry."""
    try:
        result = op(hess)
    except torch.linalg.LinAlgError as e:
        raise _overflow(hess, f"could not be factored ({e})") from None
    values = result if isinstance(result, Tensor) else result[0]
    if not bool(torch.isfinite(values).all()):
        raise _overflow(hess, "has eigenvalues that overflow float64")
    return result


def _overflow(hess: Tensor, what: str) -> DataError:
    return DataError(f"the {hess.shape[0]}x{hess.shape[1]} Hessian {what}: its largest entry is"
                     f" {float(hess.abs().max()):.3g}; the checkpoint's weights or the features are too large",
                     hint="check that the checkpoint is not diverged, and scale the features")
