"""Per-example gradients and Hessian-vector products: the one place that differentiates the model.

Everything goes through `torch.func.functional_call` with a dict of the selected parameters; the
model itself is never mutated. Per-example gradients are `vmap(grad(loss of one row))`, streamed in
blocks of rows small enough that a (rows, p) block stays under a memory budget. HVPs, vmapped over many
vectors at once, are reverse-over-reverse for the exact Hessian (`vjp` of `grad`: H is symmetric, so the
pullback of the gradient is H v) and J^T Lambda J v for Gauss-Newton (`jvp` of the forward, `jvp` of the
loss gradient in the outputs, then the forward's `vjp`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp, vmap

from . import distributed
from .errors import DataError
from .layers import capture
from .objective import Problem

with warnings.catch_warnings():  # torch's jvp rules use torch.jit.script, which warns on first import
    warnings.simplefilter("ignore", FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

Progress = Callable[[int, int], None]  # (done, total) in rows
BLOCK_BYTES = 512 * 2**20  # memory budget of one vmapped block (gradients and activations)


@dataclass(frozen=True)
class Block:
    """Per-example results for rows `idx` (B,): grads (B, p), losses (B,), outputs (B, C), targets."""

    idx: Tensor
    grads: Tensor
    losses: Tensor
    outputs: Tensor
    targets: Tensor


class GradientSource:
    def __init__(self, problem: Problem, block_bytes: int = BLOCK_BYTES) -> None:
        self.problem = problem
        self.block_bytes = block_bytes
        self._activations: int | None = None

    # ---- functional pieces -------------------------------------------------------------------
    def _state(self, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(selected params, everything else the forward needs), detached, optionally cast (ParamSpace.split)."""
        return self.problem.params.split(self.problem.model, dtype)

    def _forward(self, theta: dict[str, Tensor], rest: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.problem.model, {**theta, **rest}, (x,))

    def activation_size(self) -> int:
        """Numbers produced by one forward pass of one row (all leaf modules), measured once."""
        if self._activations is None:
            count = [0]

            def hook(_m, _i, out):  # noqa: ANN001
                if isinstance(out, Tensor):
                    count[0] += out.numel()

            leaves = [m for m in self.problem.model.modules() if not list(m.children())]
            handles = [m.register_forward_hook(hook) for m in leaves]
            try:
                _, x, _ = next(iter(self.problem.train_loader))
                with torch.no_grad():
                    self.problem.model(x[:1].to(self.problem.device))
            finally:
                for h in handles:
                    h.remove()
            self._activations = max(count[0], 1)
        return self._activations

    def rows_per_block(self, dtype: torch.dtype = torch.float32) -> int:
        """How many rows of per-example gradients fit the memory budget at once."""
        p = self.problem.params.size
        per_row = 3 * (p + self.activation_size()) * torch.finfo(dtype).bits // 8
        return max(1, self.block_bytes // per_row)

    # ---- per-example gradients ------------------------------------------------------------------
    def per_example(self, loader: Iterable[tuple[Tensor, Tensor, Tensor]], ids: Sequence[str] | None = None,
                    progress: Progress | None = None, total: int | None = None) -> Iterator[Block]:
        """Yield Blocks of per-example gradients g_i = grad L(z_i) (no regularizer), in loader order.

        Raises DataError naming the rows when a loss or gradient is NaN/inf."""
        obj, space, device = self.problem.objective, self.problem.params, self.problem.device
        theta, rest = self._state()

        def one(th: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            out = self._forward(th, rest, x.unsqueeze(0))
            loss = obj.per_example_loss(out, y.unsqueeze(0))[0]
            return loss, out[0]

        per_row = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))
        step = self.rows_per_block()
        done = 0
        for idx, x, y in loader:
            for s in range(0, len(idx), step):
                xb, yb = x[s : s + step].to(device), y[s : s + step].to(device)
                g, out = per_row(theta, xb, yb)
                grads = space.flatten(g, batched=True)
                losses = obj.per_example_loss(out, yb)
                block = Block(idx[s : s + step], grads, losses, out, yb)
                _check_finite(block, ids)
                yield block
                done += len(block.idx)
                if progress is not None:
                    progress(done, total or done)

    # ---- curvature ------------------------------------------------------------------------------
    def _batch_hvp(self, theta: dict[str, Tensor], rest: dict[str, Tensor], x: Tensor, y: Tensor
                   ) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        """v -> hess(sum of this batch's losses / n) v, exact or Gauss-Newton (J^T Lambda J v)."""
        obj, n = self.problem.objective, self.problem.n

        def batch_loss_of_outputs(out: Tensor) -> Tensor:
            return obj.per_example_loss(out, y).sum() / n

        if self.problem.hessian == "exact":
            # H is symmetric, so the vjp of the gradient is H v (reverse-over-reverse: faster than jvp of grad
            # for many vectors at once on CPU)
            _, pullback_of_grad = vjp(grad(lambda th: batch_loss_of_outputs(self._forward(th, rest, x))), theta)
            return lambda v: pullback_of_grad(v)[0]
        out, pullback = vjp(lambda th: self._forward(th, rest, x), theta)
        g_out = grad(batch_loss_of_outputs)

        def gn(v: dict[str, Tensor]) -> dict[str, Tensor]:
            _, u = jvp(lambda th: self._forward(th, rest, x), (theta,), (v,))
            _, w = jvp(g_out, (out,), (u,))
            return pullback(w)[0]

        return gn

    def _vectors_per_call(self, batch_rows: int, dtype: torch.dtype) -> int:
        p = self.problem.params.size
        per_vec = 4 * (p + batch_rows * self.activation_size()) * torch.finfo(dtype).bits // 8
        return max(1, self.block_bytes // per_vec)

    def hvp(self, vectors: Tensor, progress: Progress | None = None) -> Tensor:
        """(H + damping I) V for V of shape (k, p), H = hess of the full objective; one pass over
        the training rows, computed in V's dtype. Cost: about 4 forward passes per vector per row."""
        space, device = self.problem.params, self.problem.device
        theta, rest = self._state(vectors.dtype)
        out = torch.zeros_like(vectors)
        done = 0
        rows, split = distributed.part(self.problem.train_loader)  # torchrun: this rank's rows, summed below
        for _, x, y in rows:
            x, y = x.to(device=device, dtype=vectors.dtype if x.is_floating_point() else x.dtype), y.to(device)
            hv = self._batch_hvp(theta, rest, x, y)
            step = self._vectors_per_call(len(x), vectors.dtype)
            for s in range(0, len(vectors), step):
                tangents = space.unflatten(vectors[s : s + step])
                out[s : s + step] += space.flatten(vmap(hv)(tangents), batched=True)
            done += len(x)
            if progress is not None:
                progress(done, self.problem.n)
        if split:
            distributed.all_sum(out)
        return out + (self.problem.objective.weight_decay + self.problem.damping) * vectors

    def minibatch_hvp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """(H_B + damping I) V for V of shape (k, p), where H_B is the Hessian of the objective
        estimated on the rows (x, y): (1/|B|) sum_{i in B} L_i + 0.5 wd ||theta||^2 (unbiased for H
        when B is a uniform sample). Exact or Gauss-Newton per problem.hessian; in V's dtype.
        Cost: about 4 forward passes per vector per row of the batch."""
        space, device = self.problem.params, self.problem.device
        theta, rest = self._state(vectors.dtype)
        x, y = x.to(device=device, dtype=vectors.dtype if x.is_floating_point() else x.dtype), y.to(device)
        hv = self._batch_hvp(theta, rest, x, y)  # its losses are divided by n: rescale to a mean over B
        out = torch.empty_like(vectors)
        step = self._vectors_per_call(len(x), vectors.dtype)
        for s in range(0, len(vectors), step):
            out[s : s + step] = space.flatten(vmap(hv)(space.unflatten(vectors[s : s + step])), batched=True)
        return out * (self.problem.n / len(x)) + (self.problem.objective.weight_decay + self.problem.damping) * vectors

    def dense_hessian(self, dtype: torch.dtype = torch.float64, progress: Progress | None = None) -> Tensor:
        """H + damping I as a dense (p, p) matrix in `dtype`: the HVP of every basis vector,
        accumulated over one pass of the data. Symmetrized. Memory: p^2 of dtype.

        When the selected parameters are exactly the model's output Linear layer (logistic/linear
        regression, or `params: last_layer` on a network ending in Linear), the outputs are linear in
        them and H = (1/n) sum_i Lambda_i kron a_i a_i^T exactly (a_i = the layer's input with a 1 for
        the bias, Lambda_i = the loss Hessian in the outputs): formed with ~1 (n, p) x (n, p) product
        instead of p HVPs."""
        head = linear_head_hessian(self, dtype, progress)
        if head is not None:
            return head
        p = self.problem.params.size
        eye = torch.eye(p, dtype=dtype, device=self.problem.device)
        hess = self.hvp(eye, progress)
        return 0.5 * (hess + hess.T)

    def objective_gradient(self) -> tuple[float, Tensor]:
        """(J(theta), grad J(theta)) of the full objective at the checkpoint; ~0 at an optimum."""
        obj, n, device = self.problem.objective, self.problem.n, self.problem.device
        theta, rest = self._state()
        total = torch.zeros(self.problem.params.size, dtype=torch.float64, device=device)
        value_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per batch

        def batch_loss(th: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return obj.per_example_loss(self._forward(th, rest, x), y).sum()

        rows, split = distributed.part(self.problem.train_loader)  # torchrun: this rank's rows, summed below
        for _, x, y in rows:
            g, loss = torch.func.grad_and_value(batch_loss)(theta, x.to(device), y.to(device))
            total += self.problem.params.flatten(g).double()
            value_sum += loss.detach().double()
        value = float(value_sum)
        if split:
            distributed.all_sum(total)
            value = distributed.sum_numbers(value)[0]
        flat = self.problem.params.flatten(theta).double()
        total = total / n + obj.weight_decay * flat
        return value / n + float(obj.regularizer(flat)), total


def linear_head_hessian(source: GradientSource, dtype: torch.dtype, progress: Progress | None) -> Tensor | None:
    """The exact Hessian (+ wd + damping) for an output Linear layer, or None when not applicable."""
    problem = source.problem
    layer = _output_linear(problem)
    if layer is None:
        return None
    model, objective = problem.model, problem.objective
    module, has_w, has_b = layer
    c_out, d_in = module.out_features, module.in_features
    width = (d_in if has_w else 0) + (1 if has_b else 0)
    p = c_out * width
    hess = torch.zeros(p, p, dtype=dtype, device=problem.device)
    done = 0
    rows, split = distributed.part(problem.train_loader)  # torchrun: this rank's rows, summed below
    with capture({"head": module}) as seen:
        for _, x, y in rows:
            seen.clear()
            with torch.no_grad():
                out = model(x.to(problem.device))
            feats = seen.single("head").input.to(dtype).reshape(len(x), -1)
            parts = ([feats] if has_w else []) + ([torch.ones(len(x), 1, dtype=dtype, device=feats.device)] if has_b else [])
            a = torch.cat(parts, dim=1)  # (B, width)
            diag, low = objective.output_hessian(out.to(dtype), y.to(problem.device))
            blocks = (a.T[None] * diag.T[:, None, :]) @ a  # (C, width, width): sum_i d_ic a_i a_i^T
            view = hess.view(c_out, width, c_out, width)
            for c in range(c_out):
                view[c, :, c, :] += blocks[c]
            if low is not None:  # - sum_i (u_i kron a_i)(u_i kron a_i)^T
                q = (low[:, :, None] * a[:, None, :]).reshape(len(x), p)
                hess.addmm_(q.T, q, alpha=-1.0)
            done += len(x)
            if progress is not None:
                progress(done, problem.n)
    if split:
        distributed.all_sum(hess)
    hess /= problem.n
    # (class, input) layout -> ParamSpace layout: weight (C, d) row-major, then bias (C,)
    index = torch.arange(p, device=hess.device).view(c_out, width)
    order = torch.cat(([index[:, :d_in].reshape(-1)] if has_w else []) + ([index[:, -1]] if has_b else []))
    hess = hess[order][:, order]
    hess.diagonal().add_(objective.weight_decay + problem.damping)
    return hess


def _output_linear(problem: Problem) -> tuple[torch.nn.Linear, bool, bool] | None:
    """(layer, weight selected, bias selected) if the selected parameters are exactly those of one
    nn.Linear whose output is the model's output, checked on a real batch; else None."""
    model, names = problem.model, set(problem.params.names)
    for prefix, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        own = {f"{prefix}.{k}" if prefix else k for k, _ in module.named_parameters(recurse=False)}
        if names and names <= own:
            break
    else:
        return None
    _, x, _ = next(iter(problem.train_loader))
    with capture({"head": module}) as recorded:
        with torch.no_grad():
            out = model(x[:2].to(problem.device))
    seen = [record.output for record in recorded.calls["head"]]
    if len(seen) != 1 or seen[0].shape != out.shape or seen[0].dim() != 2 or not torch.equal(seen[0], out):
        return None
    weight = f"{prefix}.weight" if prefix else "weight"
    bias = f"{prefix}.bias" if prefix else "bias"
    return module, weight in names, bias in names


def _check_finite(block: Block, ids: Sequence[str] | None) -> None:
    bad = ~torch.isfinite(block.losses) | ~torch.isfinite(block.grads).all(dim=1)
    if bool(bad.any()):
        rows = block.idx[bad.cpu()].tolist()[:5]
        names = [ids[r] for r in rows] if ids is not None else [str(r) for r in rows]
        raise DataError(
            f"loss or gradient is NaN/inf for rows with id {', '.join(names)}",
            hint="check those rows' features and labels, and that the checkpoint is not diverged",
        )
