"""FastIF narrowing (Guo et al. 2021) for `infl rank --knn K`: which training rows to score per test row.

The metrics read nn.Linear layers through forward hooks (layers.capture): a layer's input a (a' = a with a 1 appended when its bias
is scored) and its output gradient r = dL/d(its output) (cross-entropy at the last layer: softmax - onehot). A
Linear layer's per-example gradient is r a'^T, so products of two rows' gradients factor into (a'.a')(r.r).
  cosine  the K largest a_t.a_z / (|a_t| |a_z|), a the input of the model's last Linear layer (FastIF's features)
  l2      the K smallest |a_t - a_z| in the same features
  grad    the K largest and the K most negative g_t.g_z = sum_l (a'_t.a'_z)(r_t.r_z) over the Linear layers that own
          selected parameters: the gradient inner product in those parameters. Helpful rows (positive influence) and
          harmful rows (negative) sit at opposite ends, so 2K candidates.
  kfac    as grad, with each layer's K-FAC curvature in between: sum_l (a'_t^T A_l^-1 a'_z)(r_t^T S_l^-1 r_z),
          A_l = mean a' a'^T and S_l = mean r r^T over every ceil(n / FACTOR_ROWS)-th training row, each damped by
          KFAC_DAMPING x its mean eigenvalue: the influence under a block-diagonal Kronecker-factored Hessian,
          approximately. Without the curvature, the features' common direction (post-ReLU features all point one
          way) swamps the products. The damping is large on purpose: the factors come from a subsample and serve
          only to pick candidates (README: the damping sweep behind KFAC_DAMPING).
A test row's r is that of its own label (the test loss it is about), a training row's r that of its label (the
training loss whose removal is scored). grad and kfac read the layers that see one vector per row (2-D input): a
Linear layer run per position (a sequence) is left out and named in the summary, and an error with a hint to use
cosine comes only when no layer is left.
Cost: one forward and one backward pass over all training rows in large batches, with no per-example gradients;
the same pass gives the objective's value and gradient at the checkpoint (the full ranking gets them from its
per-example gradients, which --knn computes only for the candidates). kfac needs its factors before any
similarity: it keeps every row's (a, r) from that pass when they fit the memory budget, else makes a second pass.
Memory: T x (K or 2K) indices; kfac sum_l (in_l + 1)^2 + out_l^2.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import default_collate

from . import distributed
from .data import CastLoader, Split, TensorRows, make_loader
from .errors import ConfigError, DataError
from .gradients import BLOCK_BYTES, GradientSource
from .layers import capture
from .objective import Problem

METRICS = ("cosine", "l2", "grad", "kfac")
FACTOR_ROWS = 10_000  # kfac: its factors are estimated from every ceil(n / FACTOR_ROWS)-th training row
KFAC_DAMPING = 0.3  # relative to each factor's mean eigenvalue (benchmarks/knn_speed.py --kfac-damping; README)
Batches = Iterable[tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Neighbors:
    """rows (T, K) training rows per selected test row, most similar first (grad, kfac: (T, 2K), the K largest
    then the K most negative similarities; K is capped at n); the objective J and grad J (p,) float64; which
    layers were read and left out."""

    rows: Tensor
    objective: float
    objective_grad: Tensor
    layers: tuple[str, ...] = ()  # the Linear layers the metric read
    layers_skipped: tuple[str, ...] = ()  # grad, kfac: selected Linear layers run per position, left out


@dataclass(frozen=True)
class _Site:
    """A Linear layer the metric reads; weight / bias: whether its features get the input / a 1 (the selected
    parameters for grad and kfac; cosine and l2 read the input as it is)."""

    name: str
    module: nn.Linear
    weight: bool
    bias: bool

    def features(self, a: Tensor) -> Tensor:
        parts = ([a] if self.weight else []) + ([a.new_ones(len(a), 1)] if self.bias else [])
        return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class _Rows:
    """One batch: per site the features (B, in') and output gradients (B, out); per-row losses (B,)."""

    idx: Tensor
    a: list[Tensor]
    r: list[Tensor]
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
    """The candidate training rows of each selected test row (`rows`, in that order), see the module doc.
    Under torchrun the kNN pass is not split: the ranks other than 0 end here, rank 0 continues alone."""
    check_knn(k, metric)
    distributed.leave()
    sites, skipped = _sites(problem, metric)
    test = {int(i): ([a[j] for a in h.a], [r[j] for r in h.r])
            for h in _passes(problem, sites, test_loader, metric, params=False) for j, i in enumerate(h.idx.tolist())}
    test_a = [torch.stack([test[row][0][s] for row in rows]) for s in range(len(sites))]
    test_r = [torch.stack([test[row][1][s] for row in rows]) for s in range(len(sites))]
    if metric == "cosine":
        test_a = [nn.functional.normalize(test_a[0], dim=1)]
    totals = _Totals(problem, len(sites), factors=metric == "kfac")
    train_pass = lambda params: _passes(problem, sites, _pass_loader(problem, train), metric, params, train.ids)  # noqa: E731
    blocks: Iterable[_Rows] = (totals.add(h) for h in train_pass(True))
    if metric == "kfac":
        kept = _keep_if_small(blocks)  # the pass runs here: the factors are needed before any similarity
        test_a, test_r = totals.precondition(test_a, test_r)
        blocks = kept if kept is not None else train_pass(False)
    width = min(k, problem.n)
    empty = (torch.empty(len(rows), 0, dtype=test_a[0].dtype), torch.empty(len(rows), 0, dtype=torch.long))
    best, worst = empty, empty
    for h in blocks:
        sim = _similarity(metric, test_a, test_r, h).cpu()
        idx = h.idx.expand(len(rows), -1)
        best = _merge(best, sim, idx, width, largest=True)
        if metric in ("grad", "kfac"):
            worst = _merge(worst, sim, idx, width, largest=False)
    value, grad = totals.objective()
    found = torch.cat([best[1], worst[1]], dim=1) if metric in ("grad", "kfac") else best[1]
    return Neighbors(found, value, grad, tuple(site.name or "model" for site in sites), tuple(skipped))


def grad_similarity(problem: Problem, left: Batches, right: Batches) -> Tensor:
    """g_i.g_j in the selected Linear layers' parameters for every row i of `left` and j of `right` (loader
    order): the `grad` metric."""
    sites, _ = _sites(problem, "grad")
    (a1, r1), (a2, r2) = _embed(problem, sites, left), _embed(problem, sites, right)
    return _similarity("grad", a1, r1, _Rows(torch.arange(len(a2[0])), a2, r2, torch.empty(0), None))


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


def _similarity(metric: str, test_a: list[Tensor], test_r: list[Tensor], h: _Rows) -> Tensor:
    """(T, B) similarities of the test rows to one batch of training rows."""
    if metric == "cosine":
        return test_a[0] @ nn.functional.normalize(h.a[0], dim=1).T.to(test_a[0].dtype)
    if metric == "l2":
        return -torch.cdist(test_a[0], h.a[0].to(test_a[0].dtype)).square()
    return sum((ta.to(a.dtype) @ a.T) * (tr.to(r.dtype) @ r.T)  # in the model's dtype: candidates, not scores
               for ta, tr, a, r in zip(test_a, test_r, h.a, h.r, strict=True))


def _pass_loader(problem: Problem, train: Split) -> CastLoader:
    """All training rows in batches as large as the memory budget allows (activations kept for one backward)."""
    _, x, _ = next(iter(problem.train_loader))
    per_row = 4 * (GradientSource(problem).activation_size() + x[0].numel()) * x.element_size()
    rows = max(1, min(train.n, BLOCK_BYTES // per_row))
    return CastLoader(make_loader(train, rows), next(problem.model.parameters()).dtype)


def _sites(problem: Problem, metric: str) -> tuple[list[_Site], list[str]]:
    """(sites, names of the layers left out). cosine, l2: the last Linear layer (its raw input). grad, kfac: every
    Linear layer owning selected parameters that sees one vector per row, in module order; layers run per
    position (sequences) are left out."""
    linears = [(name, m) for name, m in problem.model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("--knn: the model has no Linear layer whose input could serve as features",
                          hint="run rank without --knn")
    if metric in ("cosine", "l2"):
        return [_Site(*linears[-1], weight=True, bias=False)], []
    chosen = set(problem.params.names)
    prefix = lambda name: f"{name}." if name else ""  # noqa: E731
    sites = [_Site(name, m, f"{prefix(name)}weight" in chosen, m.bias is not None and f"{prefix(name)}bias" in chosen)
             for name, m in linears]
    sites = [s for s in sites if s.weight or s.bias]
    if not sites:
        raise ConfigError(f"--knn-metric {metric}: none of the selected parameters (params:) belongs to a Linear layer",
                          hint="use --knn-metric cosine, or select Linear layers with params:")
    per_row, skipped = _one_vector_per_row(problem, sites)
    if not per_row:
        raise ConfigError(f"--knn-metric {metric}: the selected Linear layers ({', '.join(skipped[:5])}) run on more"
                          " than one vector per row (a sequence or a feature map), where a row's gradient does not"
                          " factor into one input and one output vector",
                          hint="use --knn-metric cosine, or select a per-row layer (a classification head) with params:")
    return per_row, skipped


def _one_vector_per_row(problem: Problem, sites: list[_Site]) -> tuple[list[_Site], list[str]]:
    """(sites whose input is one vector per row in a forward pass of one training row, names of the others)."""
    with capture(_modules(sites)) as seen:
        _, x, _ = next(iter(problem.train_loader))
        with torch.no_grad():
            problem.model(x[:1].to(problem.device))
    keep = [[r.input.dim() for r in seen.calls[site.name]] == [2] for site in sites]
    return ([site for site, ok in zip(sites, keep, strict=True) if ok],
            [site.name or "model" for site, ok in zip(sites, keep, strict=True) if not ok])


def _passes(problem: Problem, sites: list[_Site], loader: Batches, metric: str, params: bool,
            ids: Sequence[str] | None = None) -> Iterator[_Rows]:
    """Per batch: each site's features and output gradient per row (one batched backward), the per-row losses
    and, with params, the gradient of the summed loss in the selected parameters."""
    model, obj, device = problem.model, problem.objective, problem.device
    selected, fixed = problem.params.split(model)
    with capture(_modules(sites), context="--knn: ", hint="use --knn-metric cosine, or a model whose Linear layers"
                 " run once per row") as seen:
        for idx, x, y in loader:
            seen.clear()
            theta = {n: t.detach().requires_grad_() for n, t in selected.items()} if params else {}
            with torch.enable_grad():
                y = y.to(device)
                out = functional_call(model, {**selected, **fixed, **theta}, (x.to(device),))
                losses = obj.per_example_loss(out, y)
                records = [seen.single(site.name) for site in sites]
                grads = torch.autograd.grad(losses.sum(), [*(r.output for r in records), *theta.values()],
                                            allow_unused=True)
            bad = ~torch.isfinite(losses.detach())
            if bool(bad.any()):
                where = [ids[i] if ids else str(i) for i in idx[bad.cpu()].tolist()[:5]]
                raise DataError(f"loss is NaN/inf for rows with id {', '.join(where)}",
                                hint="check those rows' features and labels, and that the checkpoint is not diverged")
            a_list, r_list = [], []
            for s, (site, record) in enumerate(zip(sites, records, strict=True)):
                a = record.input
                r = torch.zeros_like(record.output) if grads[s] is None else grads[s]
                if metric in ("grad", "kfac"):  # _sites kept only layers that see one vector per row
                    a = site.features(a)
                a_list.append(a.flatten(1))
                r_list.append(r.detach().flatten(1))
            param_grads = None
            if params:
                rest = grads[len(sites):]
                filled = {n: torch.zeros_like(theta[n]) if g is None else g for n, g in zip(theta, rest, strict=True)}
                param_grads = problem.params.flatten(filled)
            yield _Rows(idx, a_list, r_list, losses.detach(), param_grads)


def _modules(sites: list[_Site]) -> dict[str, nn.Module]:
    return {site.name: site.module for site in sites}


class _Totals:
    """Sums over the training pass: loss, gradient of the summed loss, and (factors) each site's A and S."""

    def __init__(self, problem: Problem, sites: int, factors: bool) -> None:
        self.problem, self.factors = problem, factors
        self.loss, self.grad = 0.0, torch.zeros(problem.params.size, dtype=torch.float64, device=problem.device)
        self.a: list[Tensor | None] = [None] * sites
        self.s: list[Tensor | None] = [None] * sites
        self.stride = -(-problem.n // FACTOR_ROWS)
        self.rows = len(range(0, problem.n, self.stride))  # rows the factors are estimated from

    def add(self, h: _Rows) -> _Rows:
        self.loss += float(h.losses.double().sum())
        if h.param_grads is not None:
            self.grad += h.param_grads.double()
        if self.factors:
            keep = (h.idx % self.stride == 0).to(h.a[0].device)  # rows 0, stride, 2 stride, ...
            for i, (a, r) in enumerate(zip(h.a, h.r, strict=True)):
                # a batch's sum in the model's dtype (float32 matmuls: float64 took most of --knn's own time),
                # running sums in float64; at most FACTOR_ROWS rows, evenly spread, estimate the factors
                a, r = (a, r) if self.stride == 1 else (a[keep], r[keep])
                aa, rr = (a.T @ a).double(), (r.T @ r).double()
                self.a[i] = aa if self.a[i] is None else self.a[i].add_(aa)
                self.s[i] = rr if self.s[i] is None else self.s[i].add_(rr)
        return h

    def objective(self) -> tuple[float, Tensor]:
        """J = mean loss + 0.5 wd |theta|^2 and grad J (p,), float64."""
        obj, n = self.problem.objective, self.problem.n
        flat = self.problem.params.flatten(self.problem.params.values(self.problem.model)).double()
        return self.loss / n + float(obj.regularizer(flat)), self.grad / n + obj.weight_decay * flat

    def precondition(self, a: list[Tensor], r: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(A_l + dI)^-1 a'_t and (S_l + dI)^-1 r_t per site for the test rows (float64), d = KFAC_DAMPING x the
        factor's mean eigenvalue."""
        return ([_solve_damped(f, x, self.rows) for f, x in zip(self.a, a, strict=True)],
                [_solve_damped(f, x, self.rows) for f, x in zip(self.s, r, strict=True)])


def _solve_damped(factor: Tensor | None, x: Tensor, n: int) -> Tensor:
    damped = torch.as_tensor(factor) / n
    damped.diagonal().add_(KFAC_DAMPING * float(damped.diagonal().mean()) + 1e-30)
    return torch.linalg.solve(damped, x.double().to(damped.device).T).T


def _keep_if_small(blocks: Iterable[_Rows]) -> list[_Rows] | None:
    """Runs the pass to its end; returns its blocks (features and output gradients only) if they fit the memory
    budget, else None."""
    kept: list[_Rows] | None = []
    size = 0
    for h in blocks:
        size += sum(t.numel() * t.element_size() for t in (*h.a, *h.r))
        if kept is not None and size <= BLOCK_BYTES:
            kept.append(_Rows(h.idx, h.a, h.r, h.losses, None))
        else:
            kept = None
    return kept


def _embed(problem: Problem, sites: list[_Site], loader: Batches) -> tuple[list[Tensor], list[Tensor]]:
    blocks = list(_passes(problem, sites, loader, "grad", params=False))
    return ([torch.cat([h.a[s] for h in blocks]) for s in range(len(sites))],
            [torch.cat([h.r[s] for h in blocks]) for s in range(len(sites))])


def _merge(state: tuple[Tensor, Tensor], sim: Tensor, idx: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    values, pos = torch.cat([state[0], sim.to(state[0].dtype)], 1), torch.cat([state[1], idx], 1)
    top, where = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest)
    return top, torch.gather(pos, 1, where)
