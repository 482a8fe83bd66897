"""FastIF narrowing (Guo et al. 2021) for `infl rank --knn K`: which training rows to score per test row.

Every metric reads the model's last nn.Linear layer: its input a (the penultimate features; a' = [a, 1] when the
layer has a bias) and its output gradient r = dL/d(its output) (cross-entropy: softmax - onehot). That layer's
per-example gradient is g = r a'^T, so g_t.g_z = (a'_t.a'_z)(r_t.r_z).
  cosine  the K largest a_t.a_z / (|a_t| |a_z|)
  l2      the K smallest |a_t - a_z|
  grad    the K largest and the K most negative (a'_t.a'_z)(r_t.r_z), the last layer's gradient inner product.
          Helpful rows (positive influence) and harmful rows (negative) sit at opposite ends, so 2K candidates.
  kfac    as grad, with that layer's K-FAC curvature between the two: g_t^T (S x A)^-1 g_z =
          (a'_t^T A^-1 a'_z)(r_t^T S^-1 r_z), A = mean a' a'^T and S = mean r r^T over the training rows, each
          damped by KFAC_DAMPING x its mean eigenvalue: the last layer's own influence, approximately. Without it
          the features' common direction (post-ReLU features all point one way) swamps the inner products.
A test row's r is that of its own label (the test loss it is about), a training row's r that of its label (the
training loss whose removal is scored).
Cost: one forward and one backward pass over all training rows in large batches, with no per-example gradients;
the same pass gives the objective's value and gradient at the checkpoint (the full ranking gets them from its
per-example gradients, which --knn computes only for the candidates). kfac needs A and S before any similarity:
it keeps every row's (a, r) from that pass when they fit the memory budget, else makes a second, forward-only
pass. Memory: T x (K or 2K) indices; kfac (d + 1)^2 + C^2.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import default_collate

from .data import CastLoader, Split, TensorRows, make_loader
from .errors import ConfigError, DataError
from .gradients import BLOCK_BYTES, GradientSource
from .objective import Problem

METRICS = ("cosine", "l2", "grad", "kfac")
KFAC_DAMPING = 0.01  # relative to each factor's mean eigenvalue; measured in benchmarks/knn_speed.py
Batches = Iterable[tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Neighbors:
    """rows (T, K) training rows per selected test row, most similar first (grad, kfac: (T, 2K), the K largest
    then the K most negative similarities; K is capped at n); the objective J and grad J (p,) float64."""

    rows: Tensor
    objective: float
    objective_grad: Tensor


@dataclass(frozen=True)
class _Head:
    """One batch through the last Linear layer: a (B, d), r (B, C) = dL_i/d(layer output), losses (B,)."""

    idx: Tensor
    a: Tensor
    r: Tensor
    losses: Tensor
    param_grads: Tensor | None  # grad of the batch's summed loss in the selected parameters (p,)


def check_knn(k: int, metric: str) -> None:
    """ConfigError for a K below 1 or an unknown metric (before any heavy work)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--knn: must be an integer >= 1, got {k!r}",
                          hint="K training rows are scored per test row; 100 is a common choice")
    if metric not in METRICS:
        raise ConfigError(f"--knn-metric: {metric!r} is not one of {', '.join(METRICS)}")


def knn_neighbors(problem: Problem, train: Split, test_loader: Batches, rows: Sequence[int], k: int,
                  metric: str) -> Neighbors:
    """The candidate training rows of each selected test row (`rows`, in that order), see the module doc."""
    check_knn(k, metric)
    bias = _last_linear(problem.model).bias is not None
    test = {int(i): (a, r) for h in _heads(problem, test_loader, metric, params=False)
            for i, a, r in zip(h.idx.tolist(), h.a, h.r, strict=True)}
    test_a = torch.stack([test[r][0] for r in rows])
    test_r = torch.stack([test[r][1] for r in rows])
    if metric == "cosine":
        test_a = nn.functional.normalize(test_a, dim=1)
    elif metric in ("grad", "kfac"):
        test_a = _homogeneous(test_a, bias)
    totals = _Totals(problem, factors=metric == "kfac")
    first = (totals.add(h) for h in _heads(problem, _pass_loader(problem, train), metric, params=True, ids=train.ids))
    blocks: Iterable[_Head] = first
    if metric == "kfac":
        blocks = _keep_if_small(first)  # the pass runs here: A and S are needed before any similarity
        test_a, test_r = totals.precondition(test_a, test_r)
        if blocks is None:
            blocks = _heads(problem, _pass_loader(problem, train), metric, params=False)
    width = min(k, problem.n)
    empty = (torch.empty(len(rows), 0, dtype=test_a.dtype), torch.empty(len(rows), 0, dtype=torch.long))
    best, worst = empty, empty
    for h in blocks:
        if metric == "cosine":
            sim = test_a @ nn.functional.normalize(h.a, dim=1).T
        elif metric == "l2":
            sim = -torch.cdist(test_a, h.a).square()
        else:
            sim = (test_a @ _homogeneous(h.a, bias).T.to(test_a.dtype)) * (test_r @ h.r.T.to(test_r.dtype))
        sim, idx = sim.cpu(), h.idx.expand(len(rows), -1)
        best = _merge(best, sim, idx, width, largest=True)
        if metric in ("grad", "kfac"):
            worst = _merge(worst, sim, idx, width, largest=False)
    value, grad = totals.objective()
    found = torch.cat([best[1], worst[1]], dim=1) if metric in ("grad", "kfac") else best[1]
    return Neighbors(found, value, grad)


def grad_similarity(problem: Problem, left: Batches, right: Batches) -> Tensor:
    """(a'_i.a'_j)(r_i.r_j) for every row i of `left` and j of `right` (loader order): the `grad` metric."""
    bias = _last_linear(problem.model).bias is not None
    (a1, r1), (a2, r2) = _embed(problem, left), _embed(problem, right)
    return (_homogeneous(a1, bias) @ _homogeneous(a2, bias).T) * (r1 @ r2.T)


def candidate_loader(split: Split, rows: Sequence[int], batch_size: int, dtype: torch.dtype) -> CastLoader:
    """Re-iterable (row_idx, x, y) batches of just `rows` of the split (ascending), batch_size rows each: the
    candidates come in dense batches instead of every batch of the full loader filtered to a few rows."""
    return CastLoader(_Picked(split, torch.as_tensor(sorted(set(rows)), dtype=torch.long), batch_size), dtype)


class _Picked:
    def __init__(self, split: Split, rows: Tensor, batch_size: int) -> None:
        self.split, self.rows, self.batch_size = split, rows, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        data = self.split.dataset
        for s in range(0, len(self.rows), self.batch_size):
            idx = self.rows[s : s + self.batch_size]
            if isinstance(data, TensorRows):  # one index_select, no per-row Python work
                yield idx, data.x.index_select(0, idx), data.y.index_select(0, idx)
            else:
                x, y = default_collate([data[i] for i in idx.tolist()])
                yield idx, x, y


def _pass_loader(problem: Problem, train: Split) -> CastLoader:
    """All training rows in batches as large as the memory budget allows (activations kept for one backward)."""
    _, x, _ = next(iter(problem.train_loader))
    per_row = 4 * (GradientSource(problem).activation_size() + x[0].numel()) * x.element_size()
    rows = max(1, min(train.n, BLOCK_BYTES // per_row))
    return CastLoader(make_loader(train, rows), next(problem.model.parameters()).dtype)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("--knn: the model has no Linear layer whose input could serve as features",
                          hint="run rank without --knn")
    return linears[-1]


def _heads(problem: Problem, loader: Batches, metric: str, params: bool,
           ids: Sequence[str] | None = None) -> Iterator[_Head]:
    """Per batch: the last Linear layer's input and output gradient per row (one batched backward), the
    per-row losses and, with params, the gradient of the summed loss in the selected parameters."""
    model, obj, device = problem.model, problem.objective, problem.device
    layer = _last_linear(model)
    seen: list[tuple[Tensor, Tensor]] = []

    def hook(_m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        if not out.requires_grad:  # nothing before it is differentiated: detaching cuts no path
            out = out.detach().requires_grad_()
        seen.append((inputs[0].detach(), out))
        return out

    named = dict(model.named_parameters())
    handle = layer.register_forward_hook(hook)
    try:
        for idx, x, y in loader:
            seen.clear()
            theta = {n: named[n].detach().requires_grad_() for n in problem.params.names} if params else {}
            with torch.enable_grad():
                y = y.to(device)
                out = functional_call(model, theta, (x.to(device),))
                losses = obj.per_example_loss(out, y)
                if len(seen) != 1:
                    raise ConfigError(f"--knn: the last Linear layer ran {len(seen)} times in one forward pass",
                                      hint="use a model whose last Linear layer runs once per row")
                a, head_out = seen[0]
                grads = torch.autograd.grad(losses.sum(), [head_out, *theta.values()], allow_unused=True)
            bad = ~torch.isfinite(losses.detach())
            if bool(bad.any()):
                where = [ids[i] if ids else str(i) for i in idx[bad.cpu()].tolist()[:5]]
                raise DataError(f"loss is NaN/inf for rows with id {', '.join(where)}",
                                hint="check those rows' features and labels, and that the checkpoint is not diverged")
            r = grads[0]
            if metric in ("grad", "kfac") and (a.dim() != 2 or r.dim() != 2):
                raise ConfigError(f"--knn-metric {metric}: the last Linear layer must see one vector per row",
                                  hint=f"its input has shape {tuple(a.shape)}; use --knn-metric cosine")
            param_grads = None
            if params:
                filled = {n: torch.zeros_like(theta[n]) if g is None else g
                          for n, g in zip(theta, grads[1:], strict=True)}
                param_grads = problem.params.flatten(filled)
            yield _Head(idx, a.flatten(1), r.detach().flatten(1), losses.detach(), param_grads)
    finally:
        handle.remove()


class _Totals:
    """Sums over the training pass: loss, gradient of the summed loss, and (factors) A and S of the kfac metric."""

    def __init__(self, problem: Problem, factors: bool) -> None:
        self.problem, self.factors = problem, factors
        self.loss, self.grad = 0.0, torch.zeros(problem.params.size, dtype=torch.float64, device=problem.device)
        self.a: Tensor | None = None
        self.s: Tensor | None = None

    def add(self, h: _Head) -> _Head:
        self.loss += float(h.losses.double().sum())
        if h.param_grads is not None:
            self.grad += h.param_grads.double()
        if self.factors:
            a = _homogeneous(h.a, _last_linear(self.problem.model).bias is not None).double()
            r = h.r.double()
            self.a = a.T @ a if self.a is None else self.a.addmm_(a.T, a)
            self.s = r.T @ r if self.s is None else self.s.addmm_(r.T, r)
        return h

    def objective(self) -> tuple[float, Tensor]:
        """J = mean loss + 0.5 wd |theta|^2 and grad J (p,), float64."""
        obj, n = self.problem.objective, self.problem.n
        flat = self.problem.params.flatten(self.problem.params.values(self.problem.model)).double()
        return self.loss / n + float(obj.regularizer(flat)), self.grad / n + obj.weight_decay * flat

    def precondition(self, a: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """(A + dI)^-1 a'_t and (S + dI)^-1 r_t for the test rows (float64), d = KFAC_DAMPING x mean eigenvalue."""
        out = []
        for factor, x in ((self.a, a), (self.s, r)):
            damped = torch.as_tensor(factor) / self.problem.n
            damped.diagonal().add_(KFAC_DAMPING * float(damped.diagonal().mean()) + 1e-30)
            out.append(torch.linalg.solve(damped, x.double().to(damped.device).T).T)
        return out[0], out[1]


def _keep_if_small(heads: Iterable[_Head]) -> list[_Head] | None:
    """Runs the pass to its end; returns its blocks (a and r only) if they fit the memory budget, else None."""
    kept: list[_Head] | None = []
    size = 0
    for h in heads:
        size += (h.a.numel() + h.r.numel()) * h.a.element_size()
        if kept is not None and size <= BLOCK_BYTES:
            kept.append(_Head(h.idx, h.a, h.r, h.losses, None))
        else:
            kept = None
    return kept


def _homogeneous(a: Tensor, bias: bool) -> Tensor:
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], dim=1) if bias else a


def _embed(problem: Problem, loader: Batches) -> tuple[Tensor, Tensor]:
    heads = list(_heads(problem, loader, "grad", params=False))
    return torch.cat([h.a for h in heads]), torch.cat([h.r for h in heads])


def _merge(state: tuple[Tensor, Tensor], sim: Tensor, idx: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    values, pos = torch.cat([state[0], sim.to(state[0].dtype)], 1), torch.cat([state[1], idx], 1)
    top, where = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest)
    return top, torch.gather(pos, 1, where)
