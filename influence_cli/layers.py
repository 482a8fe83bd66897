"""Forward hooks on named layers, in a `with` block that always removes them: the one place that records what a
layer (nn.Linear, nn.Conv2d) sees in a forward pass, for EK-FAC's factors (solvers/ekfac_layers.py), --knn's
features (knn.py) and the output-layer Hessian (gradients.py).

Per call of a layer, a `Record` keeps its first input, detached and copied (in-place ops later in the forward
cannot change it), and its output as a tensor to differentiate to: `torch.autograd.grad(loss, record.output)` is
the layer's output gradient dL/d(output), with no per-example parameter gradient formed. When nothing before the
layer requires grad, the output is made a leaf that does (grad mode on); downstream layers get a copy, so in-place
ops after the layer cannot overwrite it. The model and its parameters are left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError


@dataclass(frozen=True)
class Record:
    """One call of a layer: its input (B, ...) and its output (B, ...), see the module docstring."""

    input: Tensor
    output: Tensor


class Captured:
    """Per layer name, the Records of its calls in call order, since the last `clear()`."""

    def __init__(self, names: list[str], context: str, hint: str | None) -> None:
        self.calls: dict[str, list[Record]] = {name: [] for name in names}
        self._context, self._hint = context, hint

    def clear(self) -> None:
        for records in self.calls.values():
            records.clear()

    def missing(self) -> list[str]:
        """Names of the layers not called since the last `clear()`."""
        return [name for name, records in self.calls.items() if not records]

    def single(self, name: str) -> Record:
        """The one call of layer `name` since the last `clear()`; ConfigError when it ran more (or less) often."""
        records = self.calls[name]
        if len(records) != 1:
            raise ConfigError(f"{self._context}layer {name or 'model'} ran {len(records)} times in one forward pass;"
                              " it must run once per forward (a layer reused, as with shared weights, cannot be"
                              " read)", hint=self._hint)
        return records[0]


@contextmanager
def capture(modules: Mapping[str, nn.Module], context: str = "", hint: str | None = None) -> Iterator[Captured]:
    """Hooks on `modules` (name -> layer) recording a `Record` per call, removed on exit however the block ends.
    `context` ("--knn: ", ...) opens and `hint` follows the error `Captured.single` raises."""
    captured = Captured(list(modules), context, hint)

    def make(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if not output.requires_grad and torch.is_grad_enabled():
                output = output.detach().requires_grad_()
            captured.calls[name].append(Record(inputs[0].detach().clone(), output))
            return output.clone()

        return hook

    handles = [module.register_forward_hook(make(name)) for name, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
