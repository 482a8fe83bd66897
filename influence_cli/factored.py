"""Per-example gradients from layer factors: one forward and one backward per batch instead of a per-row vmap.

A Linear layer's per-example gradient is G_i = sum_t r_it a_it^T (out, in'): a_it its input at position t (one
position on 2-D input, a sequence position, or for Conv2d an unfolded patch) with a 1 appended when the bias is
selected (homogeneous coordinates), r_it the gradient of row i's loss at the layer's output there. One forward with
hooks (layers.capture) and ONE backward of the batch's summed loss give every r_it exactly, because the rows of a
forward pass are independent (the model is in eval mode: BatchNorm reads its running statistics):
d(sum_j L_j) / d out_i = d L_i / d out_i. G is then one batched matmul (B, out, T) x (B, T, in') per layer, against
GradientSource's vmap of a whole forward and backward per row. This is the factored structure EK-FAC's
self-influence uses (solvers/ekfac_layers.py); `rank` streams these gradients against its test-side solves, so the
cost of scoring is the (T, p) x (p, B) matmul itself.

Selected parameters outside such layers (LayerNorm, embeddings, a bare tensor, grouped convolutions, a layer called
more than once per forward, a weight shared with another module) get their per-example gradients from
gradients.GradientSource over just those parameters. `FactoredGradients.plan` checks the assembled gradients of
the first rows of the first batch (a batch of 4) against plain autograd on each row alone and declines (callers
use GradientSource) when they differ: a model that mixes rows in a forward pass (BatchNorm in train mode, a batch
mean), a weight also used outside its layer (F.linear on it), or anything else the factorization misses.

`ekfac_scored_rows` is EK-FAC's self-influence pass (the quadratic form of ekfac_layers, as the solver's own
`self_influence_blocks`) that also sums the batch's gradient (sum_i G_i = R^T A per layer), so selfcheck gets the
objective's gradient at the checkpoint from the pass it makes anyway.
Each block also carries its factors (Block.factors), from which `float64_pass` gives rank's float64 mean-test-loss
scores and summed gradient in B x p multiply-adds of small matmuls, without converting the block to float64.
Memory: a chunk's (B, p) gradients, B = GradientSource.rows_per_block (the gradient memory budget).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import DataError
from .gradients import Block, GradientSource, Progress
from .layers import capture
from .objective import ParamSpace, Problem
from .solvers.ekfac_layers import Layer, ScoredBlock, chunks, find_layers, scored_blocks

Batches = Iterable[tuple[Tensor, Tensor, Tensor]]
CHECK_ROWS = 4  # rows of the first batch whose factored gradients are checked against per-row autograd
CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}  # max over rows of ||G - G_vmap|| / ||G_vmap||


@dataclass(frozen=True)
class FactoredGradients:
    """Per-example gradients of the selected parameters: `layers` from their factors, `rest` (the others, or
    None) from GradientSource on those parameters alone. Build with `plan`."""

    problem: Problem
    layers: tuple[Layer, ...]
    rest: ParamSpace | None

    @classmethod
    def plan(cls, problem: Problem) -> tuple[FactoredGradients | None, str]:
        """(source, why): the factored source, or None with the reason when no selected parameter sits in a
        Linear / Conv2d layer or its gradients do not match per-row autograd on the first rows."""
        layers, rest_names = _sites(problem)
        if not layers:
            return None, "no selected parameter belongs to a Linear or Conv2d layer"
        first = next(iter(problem.train_loader), None)
        if first is None:
            return None, "no training rows"
        idx, x, y = (t[:CHECK_ROWS] for t in first)
        with capture({layer.path: layer.module for layer in layers}) as seen:
            with torch.no_grad():
                problem.model(x.to(problem.device))
            calls = {layer.path: len(seen.calls[layer.path]) for layer in layers}
        once = [layer for layer in layers if calls[layer.path] == 1]
        rest_names += [n for layer in layers if calls[layer.path] != 1 for n in (layer.weight, layer.bias) if n]
        if not once:
            return None, "no selected Linear/Conv2d layer runs exactly once per forward pass"
        shapes = dict(zip(problem.params.names, problem.params.shapes, strict=True))
        order = [n for n in problem.params.names if n in set(rest_names)]
        rest = ParamSpace(tuple(order), tuple(shapes[n] for n in order)) if order else None
        source = cls(problem, tuple(once), rest)
        got = next(source.per_example([(idx, x, y)])).grads
        ref = _autograd_rows(problem, x.to(problem.device), y.to(problem.device))
        diff = (got.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1).clamp_min(1e-300)
        err = float(diff.max())
        if not err <= CHECK_TOL.get(ref.dtype, CHECK_TOL[torch.float32]):
            return None, (f"the layer-factored gradients differ from per-example autograd on the first rows"
                          f" (relative error {err:.2g}): the model mixes rows or uses a weight outside its layer")
        return source, "factored"

    def describe(self) -> dict[str, Any]:
        return {"gradients": "factored", "layers": [layer.path or "model" for layer in self.layers],
                "per_example_params": list(self.rest.names) if self.rest is not None else []}

    def slots(self) -> dict[str, slice]:
        """Each selected parameter's columns in the ParamSpace layout."""
        slots, start = {}, 0
        for name, shape in zip(self.problem.params.names, self.problem.params.shapes, strict=True):
            slots[name] = slice(start, start + shape.numel())
            start += shape.numel()
        return slots

    def float64_pass(self, block: Block, mean: Tensor | None) -> tuple[Tensor, Tensor]:
        """(block.grads @ mean, block.grads summed over rows) in float64 for a block this source yielded:
        `float64_pass` below."""
        return float64_pass(block, mean, self.slots())

    def per_example(self, loader: Batches, ids: Sequence[str] | None = None, progress: Progress | None = None,
                    total: int | None = None, *, reuse: bool = False) -> Iterator[Block]:
        """Blocks of per-example gradients (B, p) in the ParamSpace layout, losses, outputs and targets, in loader
        order, as GradientSource.per_example gives them; each layer's gradients are written straight into the
        block. `reuse`: every block's gradients live in one buffer, overwritten by the next block (for a caller
        done with a block before it asks for the next: no fresh (B, p) allocation per batch). DataError naming
        the rows on a NaN/inf loss, layer input or output gradient."""
        problem, layers = self.problem, list(self.layers)
        device, obj, p = problem.device, problem.objective, problem.params.size
        slots = self.slots()
        step = GradientSource(problem).rows_per_block()
        rest = GradientSource(replace(problem, params=self.rest)) if self.rest is not None else None
        done, buffer = 0, None
        for idx, x, y in chunks(loader, step):
            x, y = x.to(device), y.to(device)
            with capture({layer.path: layer.module for layer in layers}) as records, torch.enable_grad():
                out = problem.model(x)
                losses = obj.per_example_loss(out, y)
                outs = [records.single(layer.path).output for layer in layers]
                grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
                if buffer is None or not reuse:
                    buffer = torch.empty(min(step, len(x)) if not reuse else step, p, dtype=out.dtype, device=device)
                block = buffer[: len(x)]
                finite = torch.isfinite(losses.detach())
                factors = []
                for layer, g in zip(layers, grads, strict=True):
                    ok, a, r = _write_layer(layer, records.single(layer.path).input, g, block, slots)
                    finite &= ok
                    columns = sum(slots[n].stop - slots[n].start for n in (layer.weight, layer.bias) if n)
                    if r is None or (0 if a is None else a.numel()) + r.numel() <= len(x) * columns:
                        factors.append((layer, a, r))  # kept only when no larger than the layer's gradients
            _check_finite(idx, finite, ids)
            if rest is not None:  # outside the hooks (vmap); GradientSource may cut the chunk into several blocks
                rest_grads = torch.cat([b.grads for b in rest.per_example([(idx, x, y)], ids)])
                for name, part in rest.problem.params.unflatten(rest_grads).items():
                    block[:, slots[name]] = part.reshape(len(x), -1)
            yield Block(idx, block, losses.detach(), out.detach(), y, tuple(factors))
            done += len(idx)
            if progress is not None:
                progress(done, total or done)


def _autograd_rows(problem: Problem, x: Tensor, y: Tensor) -> Tensor:
    """The reference for `plan`'s check: each row's gradient (B, p) by plain autograd on a batch of that row alone
    (no vmap: its first call costs ~160 MB and seconds, which a model without other parameters never needs)."""
    selected, fixed = problem.params.split(problem.model)
    rows = []
    for i in range(len(x)):
        theta = {n: t.detach().requires_grad_() for n, t in selected.items()}
        with torch.enable_grad():
            out = functional_call(problem.model, {**fixed, **theta}, (x[i : i + 1],))
            loss = problem.objective.per_example_loss(out, y[i : i + 1]).sum()
            grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        rows.append(problem.params.flatten({n: torch.zeros_like(theta[n]) if g is None else g
                                            for n, g in zip(theta, grads, strict=True)}))
    return torch.stack(rows)


def _sites(problem: Problem) -> tuple[list[Layer], list[str]]:
    """(factored layers, names of the other selected parameters): Linear and Conv2d (groups 1) layers whose
    selected weight / bias no other module also holds."""
    model = problem.model
    holders: dict[int, int] = {}
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    found: dict[str, Layer] = {}
    rest: list[str] = []
    for name in problem.params.names:
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        param = getattr(module, attr, None)
        ok = (isinstance(module, (nn.Linear, nn.Conv2d)) and attr in ("weight", "bias")
              and getattr(module, "groups", 1) == 1 and isinstance(param, nn.Parameter)
              and holders.get(id(param)) == 1)
        if not ok:
            rest.append(name)
            continue
        layer = found.setdefault(path, Layer(path, module, None, None))
        setattr(layer, attr, name)
    return list(found.values()), rest


def _write_layer(layer: Layer, inputs: Tensor, g: Tensor | None, block: Tensor, slots: dict[str, slice]
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Write one layer's per-row gradients into `block` (B, p): weight sum_t r_t a_t^T (B, out, in), bias sum_t r_t
    (B, out), from its recorded input and output gradient (None: the layer does not reach the loss, zeros).
    Returns (which rows had finite factors (B,), a (B, T, in) without the bias column or None, r (B, T, out) or
    None when the layer does not reach the loss)."""
    rows, out = len(block), layer.shape()[0]
    a = None
    if g is None:
        for name in (layer.weight, layer.bias):
            if name:
                block[:, slots[name]] = 0
        return torch.ones(rows, dtype=torch.bool, device=block.device), None, None
    r = layer.out_grads(g).to(block.dtype)  # (B, T, out)
    finite = torch.isfinite(r).flatten(1).all(1)
    if layer.weight:
        a = Layer(layer.path, layer.module, layer.weight, None).features(inputs)  # (B, T, in), no bias column
        finite &= torch.isfinite(a).flatten(1).all(1)
        view = block[:, slots[layer.weight]].view(rows, out, a.shape[2])
        if a.shape[1] == 1:
            torch.mul(r[:, 0, :, None], a[:, 0, None, :], out=view)
        else:
            view.copy_(r.transpose(1, 2) @ a)
    if layer.bias:
        block[:, slots[layer.bias]] = r.sum(1)
    return finite, a, r


def float64_pass(block: Block, mean: Tensor | None, slots: dict[str, slice], columns: int = 4096
                 ) -> tuple[Tensor, Tensor]:
    """(block.grads @ mean (B,) (zeros without a mean), block.grads summed over rows (p,)), both float64. The layers
    whose factors the block kept (those no larger than the layer's gradients: not a Conv2d's many unfolded
    positions) from their factors: sum_t r_t . (M a_t) and sum_i sum_t r_t a_t^T, matmuls of B x p multiply-adds in
    float64 on the small factors; the other columns from the block, converted a few thousand columns at a time (no
    float64 copy of the block)."""
    grads = block.grads
    rows, p = grads.shape
    scores = torch.zeros(rows, dtype=torch.float64, device=grads.device)
    sums = torch.empty(p, dtype=torch.float64, device=grads.device)
    done = torch.zeros(p, dtype=torch.bool)
    for layer, a, r in block.factors or ():
        names = [n for n in (layer.weight, layer.bias) if n]
        if r is None:  # the layer does not reach the loss: its columns are zeros
            for name in names:
                sums[slots[name]] = 0
                done[slots[name]] = True
            continue
        r64 = r.double()
        if layer.weight:
            a64, part = a.double(), slots[layer.weight]
            if mean is not None:
                scores += ((a64 @ mean[part].view(r.shape[2], a.shape[2]).T) * r64).sum((1, 2))
            sums[part] = (r64.flatten(0, 1).T @ a64.flatten(0, 1)).flatten()
        if layer.bias:
            part = slots[layer.bias]
            if mean is not None:
                scores += r64.sum(1) @ mean[part]
            sums[part] = r64.sum((0, 1))
        for name in names:
            done[slots[name]] = True
    rest = (~done).nonzero().flatten()
    for c in range(0, len(rest), columns):
        cols = rest[c : c + columns].to(grads.device)
        part = grads.index_select(1, cols).double()
        if mean is not None:
            scores += part @ mean[cols]
        sums[cols] = part.sum(0)
    return scores, sums


def _check_finite(idx: Tensor, finite: Tensor, ids: Sequence[str] | None) -> None:
    if not bool(finite.all()):
        rows = idx[~finite.cpu()].tolist()[:5]
        names = [ids[r] if ids is not None else str(r) for r in rows]
        raise DataError(f"loss or gradient is NaN/inf for rows with id {', '.join(names)}",
                        hint="check those rows' features and labels, and that the checkpoint is not diverged")


# ---- EK-FAC self-influence with the objective's gradient ---------------------------------------------------------
ScoredRows = ScoredBlock  # with grad_sum set


def ekfac_scored_rows(problem: Problem, state: dict[str, Any], loader: Batches, progress: Progress | None = None,
                      total: int | None = None, ids: Sequence[str] | None = None) -> Iterator[ScoredRows]:
    """g_i^T H_ekfac^-1 g_i of every row of `loader` from the factors in an EK-FAC `state()` (the solver's own
    `self_influence_blocks` computation, chunk for chunk), with each chunk's summed gradient sum_i G_i = R^T A
    per layer: one forward and one backward per chunk, no p-sized per-example gradient."""
    layers = find_layers(problem)
    for layer in layers:
        for key in ("u_a", "u_s", "diag"):
            setattr(layer, key, state["layers"][layer.path][key].to(problem.device))
    yield from scored_blocks(problem, layers, loader, progress, total, ids, sum_gradients=True)
