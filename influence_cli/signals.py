"""Per-row label-error signals: the training loss's rank and the row's estimated leave-one-out loss.

A mislabeled row is fit partly by memorizing it, so its in-sample loss understates how badly the rest
of the data disagrees with its label. The loss the row would have if it were left out (its
cross-validation loss) removes that self-fit. Influence estimates it without retraining:

- first order: removing row i moves theta by (1/n) H^-1 g_i, so
  loo_loss_i ~= L_i + g_i^T H^-1 g_i / n = loss + self_influence / n.
- Newton / Sherman-Morrison (`loo_loss`): one Newton step on the objective without row i (n kept,
  as in train.py) moves theta by exactly (1/n) (H - H_i/n)^-1 g_i, where H_i is the row's own
  Gauss-Newton curvature J_i^T Lam_i J_i (J_i = d outputs / d theta, shape (C, p); Lam_i = d^2 L /
  d outputs^2, (C, C); rank <= C). With g_i = J_i^T r_i (r_i = dL/d outputs) and the row's kernel
  K_i = J_i H^-1 J_i^T (C, C), the push-through identity gives the change of the row's outputs
  df_i = J_i dtheta = (1/n) K_i (I - Lam_i K_i / n)^-1 r_i,
  and the row's loss is then evaluated exactly at f_i + df_i (not by a Taylor expansion). For
  models linear in theta (logistic/softmax regression, linear regression) the only approximation is
  the single Newton step: this is the approximate leave-one-out (ALO) formula of GLMs (Rad &
  Maleki 2018), exact for squared loss. The (I - Lam K / n)^-1 factor (the row's leverage) is what
  first order misses: it grows exactly for the high-influence rows that matter here.

Cost of `loo_loss`: one pass over the training rows computing per-row output Jacobians (~C backward
passes per row, memory B*C*p per block) and C inverse-HVPs per row (half_ihvp for factored solvers:
one triangular solve of B*C vectors). That is C times self-influence's solve cost; for C in the
hundreds use `loo_loss_first_order`. When the selected parameters are exactly the output Linear layer
(logistic/softmax regression, `params: last_layer`) and the solver has an explicit inverse (direct),
J_i = I_C kron [a_i, 1] and K_i comes from that inverse in one GEMM per class per block of rows, about
n p^2 flops in all, ~C times less, with no Jacobian (`_head_kernels`).

`LooResult.loo_outputs` (n, C) are f_i + df_i themselves (C = 1 for binary, the output width for
regression): softmax/sigmoid of them are the leave-one-out class probabilities that
`suspicion.suspicion` and `suspicion.flag_errors` use, at no extra cost (exp(-loo_loss_i) is the
probability of the given label among them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

from .gradients import BLOCK_BYTES, OutputHead, output_head
from .layers import capture
from .objective import Problem
from .solvers import Factored, Inverted, Solver

Progress = Callable[[int, int], None]
Loader = Iterable[tuple[Tensor, Tensor, Tensor]]
LEVERAGE_CAP = 0.99  # rows whose leverage (largest eigenvalue of Lam K / n) reaches this fall back to first order
HEAD_INVERSE_MAX_P = 8192  # the output-layer kernels hold A^-1 (8 p^2 bytes, 512 MiB here) besides the solver's factor


def loss_rank(loss: np.ndarray) -> np.ndarray:
    """Rank of each row's training loss, 1 = the largest loss; ties keep row order. (n,) -> (n,) int64."""
    loss = np.asarray(loss, dtype=np.float64)
    order = np.lexsort((np.arange(len(loss)), -loss))
    ranks = np.empty(len(loss), dtype=np.int64)
    ranks[order] = np.arange(1, len(loss) + 1)
    return ranks


def loo_loss_first_order(loss: np.ndarray, self_influence: np.ndarray, n: int) -> np.ndarray:
    """loss + self_influence / n: the first-order estimate of each row's leave-one-out loss. (n,)."""
    return np.asarray(loss, dtype=np.float64) + np.asarray(self_influence, dtype=np.float64) / n


@dataclass(frozen=True)
class LooResult:
    """Per-row arrays (n,), float64, indexed by row: the Newton leave-one-out loss, its first-order
    counterpart, the training loss, self-influence r^T K r (= g^T H^-1 g), and the leverage (largest
    eigenvalue of Lam K / n, in [0, 1) for a convex objective). `capped` counts rows with leverage
    >= LEVERAGE_CAP (an inexact or indefinite H): their loo_loss drops the leverage factor, using
    df = K r / n (the first-order step, with the loss still evaluated exactly)."""

    loo_loss: np.ndarray
    loo_loss_first_order: np.ndarray
    loss: np.ndarray
    self_influence: np.ndarray
    leverage: np.ndarray
    capped: int
    outputs: np.ndarray  # (n, C) the model's outputs f_i (logits; C = 1 for binary)
    loo_outputs: np.ndarray  # (n, C) f_i + df_i: the outputs at the Newton leave-one-out parameters


def loo_loss(problem: Problem, solver: Solver, loader: Loader | None = None, progress: Progress | None = None,
             block_bytes: int = BLOCK_BYTES) -> LooResult:
    """Newton (Sherman-Morrison) estimate of every row's leave-one-out loss; see the module docstring.

    `loader` yields (row_idx, x, y) (default problem.train_loader); rows are indexed by row_idx
    into arrays of length problem.n. `solver` must be fitted on `problem`. The row's curvature
    is Gauss-Newton whatever problem.hessian says (equal to the exact one for linear models).
    The kernels K_i come from `_head_kernels` when that applies (an output Linear layer and a solver
    with an explicit inverse), else from per-row Jacobians (`_jacobian_kernels`); all that follows
    K_i is the same code."""
    loader = problem.train_loader if loader is None else loader
    n, obj = problem.n, problem.objective
    kernels = _head_kernels(problem, solver, loader, block_bytes)
    if kernels is None:
        kernels = _jacobian_kernels(problem, solver, loader, block_bytes)
    result = {k: np.full(n, np.nan) for k in ("loo", "first", "loss", "si", "lev")}
    outs: np.ndarray | None = None
    loo_outs: np.ndarray | None = None
    capped, done = 0, 0
    for ib, yb, raw, kernel in kernels:
        shape, out = raw.shape[1:], raw.reshape(len(raw), -1)
        r, lam, loss = _loss_derivatives(obj, out, yb, shape)
        si = torch.einsum("bc,bcd,bd->b", r, kernel, r)
        m = lam @ kernel / n  # Lam K / n: similar to Lam^1/2 K Lam^1/2 / n, so real eigenvalues >= 0
        lev = torch.linalg.eigvals(m).real.max(dim=1).values.clamp_min(0.0)
        ok = lev < LEVERAGE_CAP
        eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device).expand_as(m)
        solved = torch.linalg.solve(torch.where(ok[:, None, None], eye - m, eye), r.unsqueeze(2)).squeeze(2)
        moved = out + torch.einsum("bcd,bd->bc", kernel, solved) / n
        newton = _loss_at(obj, moved, yb, shape)
        rows = ib.cpu().numpy()
        if outs is None:
            outs, loo_outs = np.full((n, out.shape[1]), np.nan), np.full((n, out.shape[1]), np.nan)
        outs[rows], loo_outs[rows] = out.cpu().numpy(), moved.cpu().numpy()
        result["loo"][rows] = newton.cpu().numpy()
        result["first"][rows] = (loss + si / n).cpu().numpy()
        result["loss"][rows] = loss.cpu().numpy()
        result["si"][rows] = si.cpu().numpy()
        result["lev"][rows] = lev.cpu().numpy()
        capped += int((~ok).sum())
        done += len(ib)
        if progress is not None:
            progress(done, n)
    empty = np.zeros((n, 0))
    return LooResult(result["loo"], result["first"], result["loss"], result["si"], result["lev"], capped,
                     empty if outs is None else outs, empty if loo_outs is None else loo_outs)


Kernels = Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]  # (row_idx (B,), y, outputs (B, *shape) f64, K (B, C, C))


def _head_kernels(problem: Problem, solver: Solver, loader: Loader, block_bytes: int) -> Kernels | None:
    """K_i for an output Linear layer (`gradients.OutputHead`): J_i = I_C kron a~_i, so K_i[c, c'] =
    a~_i^T M_cc' a~_i with M = A^-1 in the (class, input) layout, blocks (width, width). Per block of rows one
    GEMM a~ (B, width) x (width, (C - c) width) per class c for the blocks c' >= c (K is symmetric) and a
    batched dot with a~: about n p^2 (1 + 1/C) flops in all, against C half-solves per row (n C p^2) through
    Jacobians. None unless the solver is `Inverted` (p <= HEAD_INVERSE_MAX_P) and the head applies."""
    if not isinstance(solver, Inverted) or problem.params.size > HEAD_INVERSE_MAX_P:
        return None
    head = output_head(problem)
    if head is None:
        return None
    inverse = solver.inverse()
    back = torch.argsort(head.order(inverse.device))
    c_out, width = head.classes, head.width
    full = inverse[back][:, back].view(c_out, width, c_out, width)
    blocks = [full[c, :, c:, :].reshape(width, (c_out - c) * width) for c in range(c_out)]
    del full, inverse
    return _head_kernel_blocks(problem, head, blocks, loader, max(1, block_bytes // (3 * 8 * problem.params.size)))


def _head_kernel_blocks(problem: Problem, head: OutputHead, blocks: list[Tensor], loader: Loader,
                        step: int) -> Kernels:
    """Yield (row_idx, y, outputs, K) per `step` rows: one no-grad forward, a~ from the head's recorded input."""
    c_out, width = head.classes, head.width
    with capture({"head": head.module}) as seen:
        for idx, x, y in loader:
            x, y = x.to(problem.device), y.to(problem.device)
            for s in range(0, len(idx), step):
                seen.clear()
                with torch.no_grad():
                    raw = problem.model(x[s : s + step]).double()
                a = head.rows(seen.single("head").input, torch.float64)  # (B, width)
                kernel = torch.empty(len(a), c_out, c_out, dtype=torch.float64, device=a.device)
                for c in range(c_out):
                    row = torch.bmm((a @ blocks[c]).view(len(a), c_out - c, width), a.unsqueeze(2)).squeeze(2)
                    kernel[:, c, c:] = row
                    kernel[:, c + 1 :, c] = row[:, 1:]
                yield idx[s : s + step], y[s : s + step], raw, kernel


def _jacobian_kernels(problem: Problem, solver: Solver, loader: Loader, block_bytes: int) -> Kernels:
    """K_i = J_i A^-1 J_i^T from per-row output Jacobians (vmap of jacrev; ~C backward passes per row, memory
    B C p per block) and C (half-)solves per row."""
    names, device = problem.params, problem.device
    chosen = set(names.names)
    theta = {k: v.detach() for k, v in problem.model.named_parameters() if k in chosen}
    rest = {k: v.detach() for k, v in problem.model.named_parameters() if k not in chosen}
    rest.update({k: b.detach() for k, b in problem.model.named_buffers()})

    def outputs_of(th: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(problem.model, {**th, **rest}, (x.unsqueeze(0),))[0].reshape(-1)

    jac = vmap(jacrev(outputs_of), in_dims=(None, 0))
    step: int | None = None
    for idx, x, y in loader:
        x, y = x.to(device), y.to(device)
        if step is None:
            with torch.no_grad():
                width = problem.model(x[:1]).shape[1:].numel()
            step = max(1, block_bytes // (3 * 8 * max(width, 1) * names.size))
        for s in range(0, len(idx), step):
            xb = x[s : s + step]
            with torch.no_grad():
                raw = problem.model(xb).double()
            kernel = _kernel(solver, _flat_jac(names.names, jac(theta, xb)).double())
            yield idx[s : s + step], y[s : s + step], raw, kernel


def _flat_jac(names: tuple[str, ...], jac: dict[str, Tensor]) -> Tensor:
    """dict of (B, C, *shape) -> (B, C, p) in ParamSpace order."""
    return torch.cat([jac[k].reshape(jac[k].shape[0], jac[k].shape[1], -1) for k in names], dim=2)


def _kernel(solver: Solver, jrows: Tensor) -> Tensor:
    """K_i = J_i H^-1 J_i^T for J (B, C, p) -> (B, C, C), symmetrized; float64."""
    b, c, p = jrows.shape
    flat = jrows.reshape(b * c, p)
    if isinstance(solver, Factored):
        half = solver.half_ihvp(flat).reshape(b, c, p)
        return half @ half.transpose(1, 2)
    k = jrows @ solver.ihvp(flat).to(torch.float64).reshape(b, c, p).transpose(1, 2)
    return 0.5 * (k + k.transpose(1, 2))


def _loss_derivatives(obj, out: Tensor, y: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    """Per row: r = dL/df (B, C), Lam = d^2L/df^2 (B, C, C), L (B,), for outputs f (B, C) float64."""

    def one(f: Tensor, t: Tensor) -> Tensor:
        return obj.per_example_loss(f.reshape(1, *shape), t.unsqueeze(0))[0]

    r = vmap(grad(one))(out, y)
    lam = vmap(jacfwd(grad(one)))(out, y)
    return r, 0.5 * (lam + lam.transpose(1, 2)), vmap(one)(out, y)


def _loss_at(obj, out: Tensor, y: Tensor, shape: torch.Size) -> Tensor:  # noqa: ANN001
    return obj.per_example_loss(out.reshape(len(out), *shape), y).double()

