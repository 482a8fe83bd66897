"""The training objective and the parameters influence is computed over.

Objective (SPEC): J(theta) = (1/n) sum_i L(z_i; theta) + 0.5 * weight_decay * ||theta||^2, the sum over
the *selected* parameters only. Influence uses g_i = grad L(z_i) (no regularizer) and
H = hess J + damping * I.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LastBlocks
from .errors import ConfigError, DataError

Task = Literal["classification", "binary", "regression"]


@dataclass(frozen=True)
class Objective:
    task: Task
    weight_decay: float

    def per_example_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Loss of each row, shape (B,): cross-entropy, logistic loss, or squared error (mean over outputs)."""
        if self.task == "classification":
            return F.cross_entropy(outputs, targets.long(), reduction="none")
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(
                outputs.reshape(outputs.shape[0]), targets.reshape(-1).to(outputs.dtype), reduction="none"
            )
        diff = outputs.reshape(outputs.shape[0], -1) - targets.reshape(outputs.shape[0], -1).to(outputs.dtype)
        return diff.square().mean(dim=1)

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """The per-row loss Hessian in the outputs as Lambda_i = diag(d_i) - u_i u_i^T: returns
        d (B, C) and u (B, C) or None. Cross-entropy: diag(p) - p p^T; logistic: s (1 - s);
        squared error averaged over k outputs: (2/k) I."""
        if self.task == "classification":
            probs = outputs.softmax(dim=1)
            return probs, probs
        if self.task == "binary":
            s = torch.sigmoid(outputs.reshape(outputs.shape[0], 1))
            return s * (1 - s), None
        k = outputs.reshape(outputs.shape[0], -1).shape[1]
        return torch.full_like(outputs.reshape(outputs.shape[0], -1), 2.0 / k), None

    def regularizer(self, flat_params: Tensor) -> Tensor:
        """0.5 * weight_decay * ||theta||^2."""
        return 0.5 * self.weight_decay * flat_params.square().sum()

    def predict(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """(predicted, prob_of_given_label): class index and p(label) for classification/binary,
        the prediction itself (first output) and None for regression."""
        if self.task == "classification":
            probs = outputs.softmax(dim=1)
            return probs.argmax(dim=1), probs.gather(1, targets.long().view(-1, 1)).squeeze(1)
        if self.task == "binary":
            p1 = torch.sigmoid(outputs.reshape(-1))
            pred = (p1 >= 0.5).long()
            return pred, torch.where(targets.reshape(-1) > 0.5, p1, 1 - p1)
        return outputs.reshape(outputs.shape[0], -1)[:, 0], None


@dataclass(frozen=True)
class ParamSpace:
    """The selected parameters, in a fixed order; flat vectors of length `size` index into them."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def size(self) -> int:
        return sum(s.numel() for s in self.shapes)

    @classmethod
    def select(cls, model: nn.Module, spec: str | tuple[str, ...] | LastBlocks) -> ParamSpace:
        """`all`, `last_layer` (the parameters of the last module that owns any), name prefixes, or
        `{last_blocks: K}` (last_blocks)."""
        named = [(n, p) for n, p in model.named_parameters()]
        if not named:
            raise DataError("the model has no parameters")
        if isinstance(spec, LastBlocks):
            chosen = last_blocks(model, spec)
        elif spec == "all":
            chosen = [n for n, _ in named]
        elif spec == "last_layer":
            owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
            last = {id(p) for p in owners[-1].parameters(recurse=False)}
            chosen = [n for n, p in named if id(p) in last]
        else:
            chosen = []
            for prefix in spec:
                hits = [n for n, _ in named if _matches(n, prefix)]
                if not hits:
                    some = ", ".join(n for n, _ in named[:8])
                    raise ConfigError(f"params: prefix {prefix!r} matches no parameter", hint=f"names start: {some}")
                chosen += [n for n in hits if n not in chosen]
            order = {n: i for i, (n, _) in enumerate(named)}
            chosen.sort(key=order.__getitem__)
        shapes = dict(named)
        return cls(tuple(chosen), tuple(shapes[n].shape for n in chosen))

    def by_module(self) -> dict[str, int]:
        """Selected parameter count per owning module (classifier: 99, bert.encoder.layer.1.output.dense: 2080),
        in model order: what `infl check` shows for a selection."""
        counts: dict[str, int] = {}
        for name, shape in zip(self.names, self.shapes, strict=True):
            module = name.rpartition(".")[0] or "(model)"
            counts[module] = counts.get(module, 0) + shape.numel()
        return counts

    def values(self, model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Detached copies of the selected parameters (optionally cast)."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().to(dtype or params[n].dtype) for n in self.names}

    def split(self, model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(selected, fixed): the selected parameters (in `names` order) and every other parameter and buffer of
        `model`, detached (floating-point ones cast to `dtype` when given), so that
        `torch.func.functional_call(model, {**selected, **fixed}, args)` is the model as a function of the
        selected parameters alone. The model itself is not changed."""
        chosen = set(self.names)

        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()

        params = dict(model.named_parameters())
        selected = {n: cast(params[n]) for n in self.names}
        fixed = {n: cast(t) for n, t in params.items() if n not in chosen}
        fixed.update({n: cast(b) for n, b in model.named_buffers()})
        return selected, fixed

    def flatten(self, tensors: dict[str, Tensor], batched: bool = False) -> Tensor:
        """dict of (*shape) -> (p,), or with batched=True dict of (B, *shape) -> (B, p)."""
        if batched:
            return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in self.names], dim=1)
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(p,) -> dict of (*shape); (k, p) -> dict of (k, *shape)."""
        lead = flat.shape[:-1]
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            stop = start + shape.numel()
            out[name] = flat[..., start:stop].reshape(*lead, *shape)
            start = stop
        return out


@dataclass
class Problem:
    """Everything a solver may read: the model at the checkpoint, the objective, the selected
    parameters, the training rows (a re-iterable loader of (row_idx, x, y)), n and the damping."""

    model: nn.Module
    objective: Objective
    params: ParamSpace
    train_loader: Iterable[tuple[Tensor, Tensor, Tensor]]
    n: int
    damping: float
    hessian: Literal["exact", "gauss_newton"] = "exact"
    seed: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def last_blocks(model: nn.Module, spec: LastBlocks) -> list[str]:
    """The parameters of the last K transformer blocks (hf.blocks: the longest ModuleList of one block type) and
    every parameter after them (the head: pooler and classifier), in model order; `linear_only`: of nn.Linear
    layers only."""
    from .hf import blocks

    name, layers = blocks(model)
    k = spec.last_blocks
    if k > len(layers):
        raise ConfigError(f"params.last_blocks: {k} is more than the model's {len(layers)} blocks ({name})",
                          hint=f"use 0 .. {len(layers)}")
    names = [n for n, _ in model.named_parameters()]
    inside = [i for i, n in enumerate(names) if _matches(n, name)]
    first = [i for i, n in enumerate(names) if _matches(n, f"{name}.{len(layers) - k}")] if k else []
    start = first[0] if first else inside[-1] + 1
    chosen = names[start:]
    if spec.linear_only:
        chosen = [n for n in chosen if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Linear)]
    if not chosen:
        raise ConfigError(f"params.last_blocks: {k} selects no parameter (nothing follows {name})",
                          hint="raise last_blocks, or use a list of parameter-name prefixes")
    return chosen


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")
