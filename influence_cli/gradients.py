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
    """Per-example results for rows `idx` (B,): grads (B, p), losses (B,), outputs (B, C), targets; `factors`: what
    factored.FactoredGradients built `grads` from, when it did (its `float64_pass` reads them)."""

    idx: Tensor
    grads: Tensor
    losses: Tensor
    outputs: Tensor
    targets: Tensor
    factors: tuple | None = None


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
        the bias, Lambda_i = the loss Hessian in the outputs): formed block by block in about half of one
        (n, p) x (n, p) product instead of p HVPs (`linear_head_hessian`)."""
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


@dataclass(frozen=True)
class OutputHead:
    """The selected parameters are exactly those of one nn.Linear whose output is the model's output (logistic or
    linear regression, `params: last_layer` on a network ending in Linear): the outputs are then linear in them,
    f_i = W a_i + b, so the output Jacobian is J_i = I_C kron a~_i with a~_i = [a_i, 1] (`rows`; the 1 only when
    the bias is selected). Matrices over these parameters are built in the (class, input) layout, index
    c * width + j, and `order` maps them to the ParamSpace layout (weight (C, d) row-major, then bias (C,))."""

    module: torch.nn.Linear
    has_weight: bool
    has_bias: bool

    @property
    def classes(self) -> int:
        return self.module.out_features

    @property
    def width(self) -> int:
        return (self.module.in_features if self.has_weight else 0) + (1 if self.has_bias else 0)

    def rows(self, inputs: Tensor, dtype: torch.dtype) -> Tensor:
        """a~ (B, width): the layer's input (B, d) as `dtype`, then a column of ones for the bias."""
        feats = inputs.to(dtype).reshape(len(inputs), -1)
        ones = torch.ones(len(inputs), 1, dtype=dtype, device=feats.device)
        return torch.cat(([feats] if self.has_weight else []) + ([ones] if self.has_bias else []), dim=1)

    def order(self, device: torch.device | None = None) -> Tensor:
        """(p,) int64: ParamSpace position k holds (class, input) position order[k], so a (class, input) matrix
        m becomes m[order][:, order] and a ParamSpace one m' becomes m'[inverse][:, inverse], inverse =
        argsort(order)."""
        index = torch.arange(self.classes * self.width, device=device).view(self.classes, self.width)
        d_in = self.module.in_features
        return torch.cat(([index[:, :d_in].reshape(-1)] if self.has_weight else [])
                         + ([index[:, -1]] if self.has_bias else []))


def linear_head_hessian(source: GradientSource, dtype: torch.dtype, progress: Progress | None) -> Tensor | None:
    """The exact Hessian (+ wd + damping) for an output Linear layer (`OutputHead`), or None when not applicable.

    H = (1/n) sum_i Lambda_i kron a~_i a~_i^T with Lambda_i = diag(d_i) - u_i u_i^T (`Objective.output_hessian`):
    its (c, c') block of (width, width) is A^T diag(delta_cc' d_c - u_c u_c') A over the rows A (B, width). Only
    the blocks c <= c' are formed (H is symmetric), one GEMM per class per batch, A^T (B x (C - c) width): about
    n p^2 (1 + 1/C) flops, half the (n, p) x (n, p) product of the full low-rank term; without u (binary,
    regression) just the C diagonal blocks."""
    problem = source.problem
    head = output_head(problem)
    if head is None:
        return None
    model, objective = problem.model, problem.objective
    c_out, width = head.classes, head.width
    upper = [torch.zeros(width, (c_out - c) * width, dtype=dtype, device=problem.device) for c in range(c_out)]
    done = 0
    rows, split = distributed.part(problem.train_loader)  # torchrun: this rank's rows, summed below
    with capture({"head": head.module}) as seen:
        for _, x, y in rows:
            seen.clear()
            with torch.no_grad():
                out = model(x.to(problem.device))
            a = head.rows(seen.single("head").input, dtype)  # (B, width)
            diag, low = objective.output_hessian(out.to(dtype), y.to(problem.device))
            for c in range(c_out):
                if low is None:  # diagonal Lambda: only the (c, c) block
                    upper[c][:, :width].addmm_(a.T, diag[:, c : c + 1] * a)
                    continue
                weights = -low[:, c : c + 1] * low[:, c:]  # (B, C - c): delta_cc' d_c - u_c u_c'
                weights[:, 0] += diag[:, c]
                upper[c].addmm_(a.T, (weights[:, :, None] * a[:, None, :]).reshape(len(a), -1))
            done += len(x)
            if progress is not None:
                progress(done, problem.n)
    hess = _mirror_blocks(upper, c_out, width)
    del upper
    if split:
        distributed.all_sum(hess)
    hess /= problem.n
    order = head.order(hess.device)
    hess = hess[order][:, order]
    hess.diagonal().add_(objective.weight_decay + problem.damping)
    return hess


def _mirror_blocks(upper: list[Tensor], classes: int, width: int) -> Tensor:
    """The symmetric (C width, C width) matrix whose block row c right of the diagonal is upper[c] (width,
    (C - c) width); the blocks below the diagonal are the transposes."""
    p = classes * width
    full = torch.empty(p, p, dtype=upper[0].dtype, device=upper[0].device)
    view = full.view(classes, width, classes, width)
    for c in range(classes):
        view[c, :, c:, :] = upper[c].view(width, classes - c, width)
        for k in range(c + 1, classes):
            view[k, :, c, :] = view[c, :, k, :].T
    diagonal = [view[c, :, c, :] for c in range(classes)]
    for block in diagonal:  # the (c, c) blocks were accumulated whole: symmetric up to roundoff, made exact
        block.copy_(0.5 * (block + block.T))
    return full


def output_head(problem: Problem) -> OutputHead | None:
    """The `OutputHead` if the selected parameters are exactly those of one nn.Linear whose output is the
    model's output (checked on a real batch) and are in ParamSpace order weight, bias; else None."""
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
    if problem.params.names not in ((weight, bias), (weight,), (bias,)):
        return None
    return OutputHead(module, weight in names, bias in names)


def _check_finite(block: Block, ids: Sequence[str] | None) -> None:
    bad = ~torch.isfinite(block.losses) | ~torch.isfinite(block.grads).all(dim=1)
    if bool(bad.any()):
        rows = block.idx[bad.cpu()].tolist()[:5]
        names = [ids[r] for r in rows] if ids is not None else [str(r) for r in rows]
        raise DataError(
            f"loss or gradient is NaN/inf for rows with id {', '.join(names)}",
            hint="check those rows' features and labels, and that the checkpoint is not diverged",
        )
