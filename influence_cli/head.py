"""A trainable head on a frozen body: when the selected parameters are those of one layer whose output is the
model's output (`params: last_layer`), the rest of the network is fixed while they are trained, so the layer's
input per training row (its *features*) is computed once and the head is optimized on them alone.

`frozen_head` finds that layer and checks it on a real batch: it runs once per forward, `head(its input)` is the
model's output exactly, and none of its parameters is used elsewhere (tied weights); otherwise there is no
head, and training goes through the whole network. `head_features` is one streamed pass of the body (no
gradients, eval mode, the model's own dtype: what the saved model computes), kept as one float64 tensor when it
fits in memory. Then one L-BFGS evaluation costs a pass over the features through one layer instead of a
forward and backward pass of the whole network: measured in benchmarks/head_polish.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .layers import capture

Loader = Iterable[tuple[Tensor, Tensor, Tensor]]
Progress = Callable[..., None]
MEMORY_SHARE = 0.25  # the features may take this share of the memory free on their device
FEATURE_BATCH_BYTES = 2**25  # rows per batch of features: about 32 MiB (the batch size only sums in another order)


class Features:
    """The head's input for every training row (n, ...) in float64 and the rows' targets (n, ...): a
    re-iterable loader of (row_idx, features, targets) batches in row order, like the training loader."""

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int) -> None:
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        n = len(self.inputs)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            yield torch.arange(start, stop), self.inputs[start:stop], self.targets[start:stop]

    @property
    def nbytes(self) -> int:
        return self.inputs.numel() * self.inputs.element_size()


def frozen_head(model: nn.Module, names: Sequence[str], sample: Tensor) -> str | None:
    """The qualified name of the layer that owns the parameters `names` when it is a head on a frozen
    body (see the module docstring), checked on `sample` (a few input rows); None otherwise (also when
    `names` are all the model's parameters: nothing is frozen)."""
    named = dict(model.named_parameters())
    chosen = {id(named[n]) for n in names}
    if not chosen or chosen == {id(p) for p in model.parameters()}:
        return None
    owners = [(q, m) for q, m in model.named_modules() if q and chosen <= {id(p) for p in m.parameters()}]
    if not owners:
        return None
    name, head = owners[-1]  # pre-order: the deepest module holding them all
    inside = {id(m) for m in head.modules()}
    if any(id(p) in chosen for m in model.modules() if id(m) not in inside for p in m.parameters(recurse=False)):
        return None  # a selected parameter also feeds the body
    param = next(model.parameters())
    x = sample.to(device=param.device, dtype=param.dtype if sample.is_floating_point() else sample.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture({"head": head}) as seen:
            out = model(x)
        calls = seen.calls["head"]
        if len(calls) != 1 or not isinstance(out, Tensor) or not torch.equal(calls[0].output, out):
            return None
        with torch.no_grad():
            again = head(calls[0].input)
        return name if isinstance(again, Tensor) and torch.equal(again, out) else None
    except (TypeError, RuntimeError):  # a head that takes more than one input
        return None
    finally:
        model.train(was_training)


def head_features(model: nn.Module, head: str, loader: Loader, n: int, batch_size: int,
                  progress: Progress | None = None, budget: int | None = None) -> Features | None:
    """One pass of `loader` (row_idx, x, y) through `model` in eval mode and its own dtype, keeping the
    input of layer `head` per row as float64; None when the n rows' features would take more than `budget`
    bytes (default: MEMORY_SHARE of the memory free on the model's device). progress(done, n) counts rows.
    The features come back in batches of at least `batch_size` rows (FEATURE_BATCH_BYTES)."""
    layer = dict(model.named_modules())[head]
    param = next(model.parameters())
    inputs: Tensor | None = None
    targets: Tensor | None = None
    done = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture({"head": layer}) as seen:
            for idx, x, y in loader:
                seen.clear()
                model(x.to(device=param.device, dtype=param.dtype if x.is_floating_point() else x.dtype))
                feats = seen.single("head").input
                if inputs is None:
                    need = n * feats[0].numel() * 8
                    if need > (budget if budget is not None else _free_bytes(param.device) * MEMORY_SHARE):
                        return None
                    inputs = torch.empty((n, *feats.shape[1:]), dtype=torch.float64, device=param.device)
                    targets = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=param.device)
                idx = idx.to(param.device)
                inputs[idx] = feats.to(torch.float64)
                targets[idx] = y.to(param.device)  # type: ignore[index]
                done += len(idx)
                if progress is not None:
                    progress(done, n)
    finally:
        model.train(was_training)
    if inputs is None or targets is None:
        return None
    width = max(inputs[0].numel(), 1)
    return Features(inputs, targets, max(batch_size, FEATURE_BATCH_BYTES // (8 * width)))


def _free_bytes(device: torch.device) -> float:
    """Memory free for new tensors on `device` (CUDA: the allocator's free memory; CPU: available RAM)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 2.0 * 2**30
