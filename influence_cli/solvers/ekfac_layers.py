"""EK-FAC's layer plumbing: which modules are factored, what a forward pass records, and the per-row
pseudo-gradients the Kronecker factors are built from (see ekfac.py for the method).

`find_layers` groups the selected parameters by nn.Linear / nn.Conv2d module; `capture` is layers.capture (the
project's one `with` block of forward hooks, always removed on exit) on those layers, and `features` turns a
recorded input into a (B, T, in'); `pseudo_gradients` pulls the columns of the output factor B (B B^T = the loss Hessian in the outputs)
back to every layer's output in one vmapped backward per chunk of rows. `sum_squared_projections` and
`quadratic_form` evaluate (U_S^T G U_A)^2 sums from a and g without forming G for Linear layers on 2-D input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..config import EkfacConfig
from ..errors import ConfigError, DataError, NotFittedError
from ..gradients import BLOCK_BYTES
from ..layers import Captured
from ..layers import capture as layer_capture
from ..objective import Problem

EXACT_MAX_OUTPUTS = 64  # output_factor auto: exact GN columns up to this many model outputs, else sampled
CHUNK_ELEMENTS = 2**24  # rows x out x in' of one chunk of per-example layer gradients (conv / sequence layers)


@dataclass
class Layer:
    """One Kronecker-factored layer: the module, which of its parameters are selected, and its fitted factors."""

    path: str
    module: nn.Module
    weight: str | None  # selected parameter names (None: not selected)
    bias: str | None
    a_cov: Tensor | None = None  # (in', in') and (out, out) sums, float64, during pass 1
    s_cov: Tensor | None = None
    positions: int = 0  # rows x positions seen in pass 1
    u_a: Tensor | None = None  # eigenvectors and (clamped) eigenvalues of A and S
    u_s: Tensor | None = None
    a_val: Tensor | None = None
    s_val: Tensor | None = None
    corrected: Tensor | None = None  # (out, in') n x lambda, during pass 2
    diag: Tensor | None = None  # (out, in') lambda + weight_decay + damping, floored

    def features(self, x: Tensor) -> Tensor:
        """Layer input -> (B, T, in'): flattened (conv: unfolded) inputs, with a 1 appended for the bias."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            x = F.pad(x, _conv_padding(m), mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
            x = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride).transpose(1, 2)
        else:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        parts = ([x] if self.weight else []) + ([x.new_ones(*x.shape[:2], 1)] if self.bias else [])
        return torch.cat(parts, dim=2)

    def out_grads(self, g: Tensor) -> Tensor:
        """Gradient at the layer output -> (B, T, out)."""
        if isinstance(self.module, nn.Conv2d):
            return g.flatten(2).transpose(1, 2)
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def shape(self) -> tuple[int, int]:
        m = self.module
        out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        inp = (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) if isinstance(m, nn.Conv2d) else m.in_features
        return out, (inp if self.weight else 0) + (1 if self.bias else 0)

    def gather(self, tensors: dict[str, Tensor], k: int) -> Tensor:
        """dict of (k, *param shape) -> (k, out, in') in this layer's layout."""
        out, _ = self.shape()
        parts = ([tensors[self.weight].reshape(k, out, -1)] if self.weight else [])
        parts += [tensors[self.bias].reshape(k, out, 1)] if self.bias else []
        return torch.cat(parts, dim=2)

    def scatter(self, mat: Tensor, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
        """(k, out, in') -> dict of (k, *param shape)."""
        k, res = mat.shape[0], {}
        if self.weight:
            res[self.weight] = mat[:, :, : mat.shape[2] - (1 if self.bias else 0)].reshape(k, *shapes[self.weight])
        if self.bias:
            res[self.bias] = mat[:, :, -1].reshape(k, *shapes[self.bias])
        return res



def find_layers(problem: Problem) -> list[Layer]:
    """Group the selected parameters by owning module; only Linear and Conv2d (groups 1) are supported."""
    model, found, bad = problem.model, {}, []
    for name in problem.params.names:
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        ok = isinstance(module, (nn.Linear, nn.Conv2d)) and attr in ("weight", "bias")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ConfigError(f"solver.name: ekfac does not support grouped convolutions ({path}, groups="
                              f"{module.groups})", hint="exclude it with params: [list of prefixes], or use"
                              " solver.name: arnoldi")
        if not ok:
            bad.append(f"{name} ({type(module).__name__})")
            continue
        layer = found.setdefault(path, Layer(path, module, None, None))
        setattr(layer, attr, name)
    if bad:
        raise ConfigError(
            f"solver.name: ekfac factors only Linear and Conv2d layers; these selected parameters belong to other"
            f" layer types: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}",
            hint="exclude them with params: last_layer or params: [list of parameter-name prefixes], or use"
                 " solver.name: arnoldi or cg")
    return list(found.values())


def capture(layers: list[Layer]) -> AbstractContextManager[Captured]:
    """layers.capture on the factored layers (by path): each layer's input and output per call, hooks always
    removed on exit. The model and its parameters are left untouched."""
    return layer_capture({layer.path: layer.module for layer in layers}, context="solver.name: ekfac: ",
                         hint="exclude it with params: [list of prefixes], or use solver.name: arnoldi")


def features(layer: Layer, records: Captured) -> Tensor:
    """The layer's features (B, T, in') in the last forward pass (it must have run once)."""
    return layer.features(records.single(layer.path).input)


@dataclass(frozen=True)
class ScoredBlock:
    """Self-influence of rows `idx` (B,) under the fitted factors, with their losses (B,), model outputs (B, C) and
    targets; with `sum_gradients`, also the gradient of the rows' summed loss in the selected parameters (p,)
    float64 (selfcheck's grad J, from the same pass)."""

    idx: Tensor
    self_influence: Tensor
    losses: Tensor
    outputs: Tensor
    targets: Tensor
    grad_sum: Tensor | None = None


def scored_blocks(problem: Problem, layers: list[Layer], loader: Iterable[tuple[Tensor, Tensor, Tensor]],
                  progress: Callable[[int, int], None] | None = None, total: int | None = None,
                  ids: Sequence[str] | None = None, sum_gradients: bool = False) -> Iterator[ScoredBlock]:
    """g_i^T H_ekfac^-1 g_i of each row of `loader` from the fitted `layers` (u_a, u_s, diag set): one forward and
    one backward per chunk and the layers' inputs and output gradients, never the (B, p) per-example gradient.
    Peak memory: a chunk's activations plus (B, out, in') for conv/sequence layers. DataError (naming `ids`, or row
    numbers) when a loss is NaN/inf. The one loop behind EkfacSolver.self_influence_blocks and selfcheck's pass."""
    first = next(iter(loader), None)
    if first is None:
        return
    obj, done = problem.objective, 0
    shapes = dict(zip(problem.params.names, problem.params.shapes, strict=True))
    with torch.enable_grad(), capture(layers) as records:
        _, rows = plan(problem, layers, records, first[1][:1].to(problem.device), None)
        for idx, x, y in chunks(loader, rows):
            x, y = x.to(problem.device), y.to(problem.device)
            records.clear()
            out = problem.model(x)
            losses = obj.per_example_loss(out, y)
            if not bool(torch.isfinite(losses).all()):
                bad = idx[~torch.isfinite(losses).cpu()].tolist()[:5]
                names = ", ".join(ids[r] if ids is not None else str(r) for r in bad)
                raise DataError(f"loss is NaN/inf for rows with id {names}",
                                hint="check those rows' features and labels, and that the checkpoint is not diverged")
            grads = torch.autograd.grad(losses.sum(), [records.single(layer.path).output for layer in layers],
                                        allow_unused=True)
            si = torch.zeros(len(x), dtype=torch.float64, device=problem.device)
            summed: dict[str, Tensor] = {}
            for layer, g in zip(layers, grads, strict=True):
                a = features(layer, records)
                gs = layer.out_grads(g) if g is not None else a.new_zeros(*a.shape[:2], layer.shape()[0])
                si += quadratic_form(layer, a, gs)
                if sum_gradients:
                    total_g = gs.reshape(-1, gs.shape[-1]).double().T @ a.reshape(-1, a.shape[-1]).double()
                    summed.update(layer.scatter(total_g[None], shapes))
            records.clear()
            grad_sum = problem.params.flatten({k: v[0] for k, v in summed.items()}) if sum_gradients else None
            yield ScoredBlock(idx, si, losses.detach(), out.detach(), y, grad_sum)
            done += len(x)
            if progress is not None:
                progress(done, total or done)


def _cotangents(problem: Problem, out: Tensor, mode: str, samples: int, gen: torch.Generator) -> Tensor:
    """(m, B, K) columns of B with B B^T = the output Hessian of each row's loss (exact), or m = samples
    draws of B z / sqrt(m), z ~ N(0, I) (sample). Computed in the output's dtype."""
    task = problem.objective.task
    flat = out.detach().reshape(out.shape[0], -1)
    rows, k = flat.shape
    z = (torch.randn(samples, rows, k, generator=gen, device=flat.device, dtype=flat.dtype) / samples**0.5
         if mode == "sample" else None)  # sum over the m draws of (B z)(B z)^T estimates B B^T
    if task == "classification":
        p = flat.softmax(dim=1)
        sp = p.sqrt()
        if z is None:
            eye = torch.eye(k, dtype=flat.dtype, device=flat.device)
            return sp.T[:, :, None] * (eye[:, None, :] - p[None])
        return sp * z - p * (sp * z).sum(dim=2, keepdim=True)
    if task == "binary":
        s = torch.sigmoid(flat)
        root = (s * (1 - s)).sqrt()
        return root[None] if z is None else root * z
    scale = (2.0 / k) ** 0.5
    if z is None:
        return scale * torch.eye(k, dtype=flat.dtype, device=flat.device)[:, None, :].expand(k, rows, k)
    return scale * z


def plan(problem: Problem, layers: list[Layer], records: Captured, x: Tensor,
          opts: EkfacConfig | None) -> tuple[str, int]:
    """Forward one row: (exact | sample, rows per chunk so that features and m pseudo-gradients of all layers
    stay under the gradient memory budget). opts None: one true gradient per row (self-influence)."""
    records.clear()
    with torch.no_grad():
        k = problem.model(x).reshape(len(x), -1).shape[1]
    missing = records.missing()
    if missing:
        raise ConfigError(f"solver.name: ekfac: layers {', '.join(missing)} are not called in the forward pass",
                          hint="exclude their parameters with params: [list of prefixes]")
    mode = "exact" if opts is None else opts.output_factor
    if mode == "auto":
        mode = "exact" if k <= EXACT_MAX_OUTPUTS else "sample"
    m = 1 if opts is None else (k if mode == "exact" else opts.samples)
    per_row = sum(a.shape[1] * (a.shape[2] + m * layer.shape()[0]) for layer in layers
                  for a in [features(layer, records)])
    records.clear()
    return mode, max(1, BLOCK_BYTES // (4 * per_row * x.element_size()))


def chunks(loader: Iterable[tuple[Tensor, Tensor, Tensor]], rows: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The loader's batches, cut into chunks of at most `rows` rows."""
    for idx, x, y in loader:
        for s in range(0, len(x), rows):
            yield idx[s : s + rows], x[s : s + rows], y[s : s + rows]


def pseudo_gradients(problem: Problem, layers: list[Layer], records: Captured,
                      mode: str, samples: int, rows: int) -> Iterator[tuple[Tensor, list[Tensor], list[Tensor]]]:
    """Per chunk of rows: (x, features per layer (B, T, in'), pseudo-gradients per layer (m, B, T, out)).
    Sampled cotangents come from a generator seeded per chunk with (problem.seed, the chunk's first row):
    the same draws on every pass, and under torchrun on whichever rank holds the chunk. Under torchrun
    only this rank's rows are visited (distributed.part; the caller sums the statistics)."""
    gen = torch.Generator(device=problem.device)
    loader, _ = distributed.part(problem.train_loader)
    for idx, x, _y in chunks(loader, rows):
        gen.manual_seed(problem.seed * 1_000_003 + int(idx[0]))  # idx is on the host: no device sync
        records.clear()
        x = x.to(problem.device)
        out = problem.model(x)
        cot = _cotangents(problem, out, mode, samples, gen)
        s_list = [records.single(layer.path).output for layer in layers]
        grads = _pullback(out, s_list, cot.reshape(cot.shape[0], *out.shape))
        mask = position_mask(problem, x)
        feats = [masked(features(layer, records), mask) for layer in layers]
        pseudo = [layer.out_grads(g.flatten(0, 1)).unflatten(0, g.shape[:2]) if g is not None
                  else a.new_zeros(cot.shape[0], *a.shape[:2], layer.shape()[0])
                  for layer, a, g in zip(layers, feats, grads, strict=True)]
        records.clear()
        yield x, feats, pseudo


def position_mask(problem: Problem, x: Tensor) -> Tensor | None:
    """(B, T) bool: the real positions of a batch of padded sequences, from a model that says which
    (`model.position_mask(x)`, hf.py); None (every position counts) for every other model."""
    fn = getattr(problem.model, "position_mask", None)
    return fn(x) if callable(fn) else None


def masked(a: Tensor, mask: Tensor | None) -> Tensor:
    """Features (B, T, in') with padded positions zeroed, so A is the mean over real positions only (their
    output gradients are zero already: padding changes no row's G). Layers seeing one vector per row: as given."""
    return a if mask is None or a.shape[1] != mask.shape[1] else a * mask[:, :, None].to(a.dtype)


def counted(a: Tensor, mask: Tensor | None) -> int:
    """The positions of features `a` (B, T, in') that count toward A: the real ones (see `masked`)."""
    return a.shape[0] * a.shape[1] if mask is None or a.shape[1] != mask.shape[1] else int(mask.sum())


def _pullback(out: Tensor, inputs: list[Tensor], cotangents: Tensor) -> list[Tensor | None]:
    """d<out, cotangent>/d input for each of the m cotangents (m, *out.shape) -> (m, *input.shape) per input:
    one vmapped backward (is_grads_batched), or m backward passes when an op has no batching rule."""
    try:
        return list(torch.autograd.grad(out, inputs, cotangents, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True))
    except RuntimeError:
        cols = [torch.autograd.grad(out, inputs, c, retain_graph=True, allow_unused=True) for c in cotangents]
        return [None if col[0] is None else torch.stack(col) for col in zip(*cols, strict=True)]


def sum_squared_projections(layer: Layer, a: Tensor, gs: Tensor) -> Tensor:
    """sum over rows and pseudo-gradients of (U_S^T G U_A)^2, G = sum_t g_t a_t^T; (out, in') float64.
    a: (B, T, in'), gs: (m, B, T, out)."""
    u_a, u_s = fitted(layer.u_a).to(a.dtype), fitted(layer.u_s).to(a.dtype)
    a_rot, g_rot = a @ u_a, gs @ u_s
    if a.shape[1] == 1:  # Linear on 2-D input: G = g a^T, so (U_S^T G U_A)^2 = (U_S^T g)^2 (U_A^T a)^2^T
        g_sq = g_rot[:, :, 0].square().sum(dim=0)  # (B, out)
        return (g_sq.T @ a_rot[:, 0].square()).double()
    total = torch.zeros(layer.shape(), dtype=torch.float64, device=a.device)
    out, inp = layer.shape()
    step = max(1, CHUNK_ELEMENTS // (gs.shape[0] * out * inp))
    for s in range(0, a.shape[0], step):
        mats = torch.einsum("mbto,bti->mboi", g_rot[:, s : s + step], a_rot[s : s + step])
        total += mats.square().sum(dim=(0, 1)).double()
    return total


def quadratic_form(layer: Layer, a: Tensor, g: Tensor) -> Tensor:
    """Per row: sum_kl (U_S^T G U_A)_kl^2 / diag_kl, G = sum_t g_t a_t^T. a: (B, T, in'), g: (B, T, out) -> (B,)."""
    diag = fitted(layer.diag)
    a_rot, g_rot = a @ fitted(layer.u_a).to(a.dtype), g @ fitted(layer.u_s).to(g.dtype)
    inv = diag.reciprocal()
    if a.shape[1] == 1:
        return ((g_rot[:, 0].double().square() @ inv) * a_rot[:, 0].double().square()).sum(dim=1)
    out, inp = layer.shape()
    step = max(1, CHUNK_ELEMENTS // (out * inp))
    parts = []
    for s in range(0, a.shape[0], step):
        mats = torch.einsum("bto,bti->boi", g_rot[s : s + step], a_rot[s : s + step]).double()
        parts.append((mats.square() * inv).sum(dim=(1, 2)))
    return torch.cat(parts)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) for F.pad, for int, 'valid' and 'same' paddings."""
    if m.padding == "valid":
        return (0, 0, 0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = m.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def fitted(value: Tensor | None) -> Tensor:
    """A layer factor that `fit` computes; NotFittedError (not an assert, which -O removes) before."""
    if value is None:
        raise NotFittedError("solver ekfac: call fit() before using it")
    return value
