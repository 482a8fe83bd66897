"""EK-FAC solver (George et al. 2018; Grosse et al. 2023): Kronecker-factored, eigenvalue-corrected curvature.

Method. H is approximated block-diagonally, one block per nn.Linear / nn.Conv2d layer among the selected
parameters. A layer's per-example gradient is G = sum_t g_t a_t^T (out, in'): a_t the layer input at position
t (conv: an unfolded patch) with a trailing 1 when its bias is selected (homogeneous coordinates), g_t the
gradient at the layer output. With the Gauss-Newton factorization of the output Hessian Lambda = B B^T
(softmax CE: B = diag(sqrt p) - p sqrt(p)^T; logistic: sqrt(s(1-s)); MSE over k outputs: sqrt(2/k) I), each
column of B, pulled back through the network, is a pseudo-gradient g_c whose sum_c g_c g_c^T equals the GN's
output factor exactly (`output_factor: sample` draws B z, z ~ N(0, I), instead: an unbiased Monte-Carlo GN).
  pass 1:  A = mean_(rows, positions) a a^T,  S = (1/n) sum_rows sum_c sum_t g g^T,  A = U_A diag U_A^T, S = ...
  pass 2:  lambda_kl = (1/n) sum_rows sum_c ((U_S^T G_c U_A)_kl)^2     (the eigenvalue correction; K-FAC: s_k a_l)
  H_layer ~= (U_S x U_A) diag(lambda + weight_decay + damping) (U_S x U_A)^T.
For one Linear layer with MSE, S is constant and the correction makes this equal to H exactly.

Cost: two passes over the training rows, each one forward and m backward passes (m = outputs, or `samples`),
plus projections of ~ n m (out^2 + in^2) per layer; eigendecompositions ~ out^3 + in^3. Memory: the factors,
sum over layers of out^2 + in^2 + out in floats (float64), independent of n.
ihvp / half_ihvp: two small matmuls per layer per vector, (k, p) -> (k, p) float64. `self_influence_blocks`
scores rows from layer inputs and output gradients only (for a Linear layer G = g a^T, so the quadratic form is
sum_kl (U_S^T g)_k^2 (U_A^T a)_l^2 / lambda_kl): it never forms the p-sized per-example gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EkfacConfig, SolverConfig
from ..errors import ConfigError, DataError, NotFittedError
from ..gradients import BLOCK_BYTES
from ..objective import Problem
from .base import Cost, Progress, require_fitted

EXACT_MAX_OUTPUTS = 64  # output_factor auto: exact GN columns up to this many model outputs, else sampled
CHUNK_ELEMENTS = 2**24  # rows x out x in' of one chunk of per-example layer gradients (conv / sequence layers)
EIGEN_FLOOR = 1e-10


@dataclass
class _Layer:
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


@dataclass(frozen=True)
class ScoredBlock:
    """Self-influence of rows `idx` (B,) with their losses (B,), model outputs (B, C) and targets."""

    idx: Tensor
    self_influence: Tensor
    losses: Tensor
    outputs: Tensor
    targets: Tensor


class EkfacSolver:
    name: ClassVar[str] = "ekfac"

    def __init__(self, config: SolverConfig) -> None:
        self.config = config
        self._layers: list[_Layer] | None = None
        self._problem: Problem | None = None
        self._info: dict[str, Any] = {}

    @classmethod
    def estimate(cls, config: SolverConfig, n: int, p: int) -> Cost:
        # Layer shapes are unknown here: assume square-ish layers, out ~ in ~ sqrt(p), and 10 outputs.
        side = max(1.0, p**0.5)
        m = 10 if config.ekfac.output_factor != "sample" else config.ekfac.samples
        passes = 2 if config.ekfac.correct_eigenvalues else 1
        return Cost(memory_bytes=int(8 * 3 * p + 2**27),
                    fit_flops=passes * n * (2 + 2 * m) * (p + 2 * side * side) + 4 * side**3,
                    note="Kronecker factors per Linear/Conv2d layer, float64; memory independent of n")

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self, problem: Problem, progress: Progress | None = None) -> Self:
        layers, opts, n = _find_layers(problem), self.config.ekfac, problem.n
        total, done = (2 if opts.correct_eigenvalues else 1) * n, 0
        with torch.enable_grad(), _capture(layers) as records:
            first = next(iter(problem.train_loader))[1][:1].to(problem.device)
            mode, rows = _plan(problem, layers, records, first, opts)
            for layer in layers:
                out, inp = layer.shape()
                layer.a_cov = torch.zeros(inp, inp, dtype=torch.float64, device=problem.device)
                layer.s_cov = torch.zeros(out, out, dtype=torch.float64, device=problem.device)
            for x, feats, pseudo in _pseudo_gradients(problem, layers, records, mode, opts.samples, rows):
                for layer, a, gs in zip(layers, feats, pseudo, strict=True):
                    a64 = a.reshape(-1, a.shape[2]).double()
                    layer.a_cov += a64.T @ a64
                    layer.positions += a64.shape[0]
                    g64 = gs.reshape(-1, gs.shape[-1]).double()
                    layer.s_cov += g64.T @ g64
                done = _tick(progress, done + len(x), total)
            bad = [layer.path for layer in layers if not bool(torch.isfinite(layer.a_cov).all()
                                                              and torch.isfinite(layer.s_cov).all())]
            if bad:
                raise DataError(f"ekfac: NaN/inf activations or gradients at layers {', '.join(bad)}",
                                hint="check the training rows' features (selfcheck with solver.name: direct names"
                                     " the rows) and that the checkpoint is not diverged")
            for layer in layers:
                a_val, layer.u_a = torch.linalg.eigh(layer.a_cov / max(layer.positions, 1))
                s_val, layer.u_s = torch.linalg.eigh(layer.s_cov / n)
                layer.a_val, layer.s_val = a_val.clamp_min(0), s_val.clamp_min(0)
                layer.a_cov = layer.s_cov = None
                layer.corrected = (torch.zeros(layer.shape(), dtype=torch.float64, device=problem.device)
                                   if opts.correct_eigenvalues else n * torch.outer(layer.s_val, layer.a_val))
            if opts.correct_eigenvalues:  # otherwise K-FAC's eigenvalues s_k a_l
                for x, feats, pseudo in _pseudo_gradients(problem, layers, records, mode, opts.samples, rows):
                    for layer, a, gs in zip(layers, feats, pseudo, strict=True):
                        layer.corrected += _sum_squared_projections(layer, a, gs)
                    done = _tick(progress, done + len(x), total)
        self._info = _finish(layers, problem)
        self._info.update(output_factor=mode, correct_eigenvalues=opts.correct_eigenvalues)
        self._layers, self._problem = layers, problem
        return self

    # ---- apply ----------------------------------------------------------------------------------
    def _apply(self, v: Tensor, power: float) -> list[Tensor]:
        """Per layer: U_S^T V U_A * diag^power, (k, out, in') float64, in the Kronecker eigenbasis."""
        layers = require_fitted(self, "_layers")
        problem: Problem = require_fitted(self, "_problem")
        v64 = v.to(device=problem.device, dtype=torch.float64)
        tensors = problem.params.unflatten(v64)
        res = []
        for layer in layers:
            mat = layer.gather(tensors, len(v64))
            res.append(layer.u_s.T @ mat @ layer.u_a * layer.diag.pow(power))
        return res

    def ihvp(self, v: Tensor) -> Tensor:
        """(H_ekfac + (weight_decay + damping) I)^-1 v for v (k, p) -> (k, p) float64."""
        rotated = self._apply(v, -1.0)
        problem: Problem = require_fitted(self, "_problem")
        layers = require_fitted(self, "_layers")
        shapes = dict(zip(problem.params.names, problem.params.shapes, strict=True))
        out: dict[str, Tensor] = {}
        for layer, mat in zip(layers, rotated, strict=True):
            out.update(layer.scatter(layer.u_s @ mat @ layer.u_a.T, shapes))
        return problem.params.flatten(out, batched=True)

    def half_ihvp(self, v: Tensor) -> Tensor:
        """A v = diag^-1/2 (U_S x U_A)^T v per layer, so ||A g||^2 = g^T H_ekfac^-1 g. (k, p) -> (k, p) float64
        (coordinates in the eigenbasis, layer after layer). Costs (out^2 in' + out in'^2) per row and layer:
        for many training rows prefer `self_influence_blocks`."""
        rotated = self._apply(v, -0.5)
        return torch.cat([r.reshape(r.shape[0], -1) for r in rotated], dim=1)

    def self_influence_blocks(self, loader: Iterable[tuple[Tensor, Tensor, Tensor]], progress: Progress | None = None,
                              total: int | None = None, ids: Sequence[str] | None = None) -> Iterator[ScoredBlock]:
        """g_i^T H_ekfac^-1 g_i of each row of `loader`, from one forward and one backward per batch and the
        layers' inputs and output gradients; the (B, p) per-example gradient is never formed. Peak memory: a
        batch's activations plus (B, out, in') for conv/sequence layers, chunked. DataError (naming `ids`, or row
        numbers) when a loss is NaN/inf."""
        layers = require_fitted(self, "_layers")
        problem: Problem = require_fitted(self, "_problem")
        obj, done = problem.objective, 0
        first = next(iter(loader), None)
        if first is None:
            return
        with torch.enable_grad(), _capture(layers) as records:
            _, rows = _plan(problem, layers, records, first[1][:1].to(problem.device), None)
            for idx, x, y in _split(loader, rows):
                x, y = x.to(problem.device), y.to(problem.device)
                records.clear()
                out = problem.model(x)
                losses = obj.per_example_loss(out, y)
                if not bool(torch.isfinite(losses).all()):
                    bad = idx[~torch.isfinite(losses).cpu()].tolist()[:5]
                    names = ", ".join(ids[r] if ids is not None else str(r) for r in bad)
                    raise DataError(f"loss is NaN/inf for rows with id {names}",
                                    hint="check those rows' features and labels, and that the checkpoint is not diverged")
                s_list = [records[layer.path][1] for layer in layers]
                grads = torch.autograd.grad(losses.sum(), s_list, allow_unused=True)
                si = torch.zeros(len(x), dtype=torch.float64, device=problem.device)
                for layer, g in zip(layers, grads, strict=True):
                    a = records[layer.path][0]
                    gs = layer.out_grads(g) if g is not None else a.new_zeros(*a.shape[:2], layer.shape()[0])
                    si += _quadratic_form(layer, a, gs)
                records.clear()
                yield ScoredBlock(idx, si, losses.detach(), out.detach(), y)
                done = _tick(progress, done + len(x), total or done + len(x))

    def self_influence_fast(self, loader: Iterable[tuple[Tensor, Tensor, Tensor]], n: int,
                            progress: Progress | None = None) -> Tensor:
        """Self-influence of every row of `loader` as an (n,) float64 tensor indexed by row_idx."""
        res = torch.zeros(n, dtype=torch.float64)
        for block in self.self_influence_blocks(loader, progress, n):
            res[block.idx] = block.self_influence.cpu()
        return res

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self._info}


# ---- helpers ------------------------------------------------------------------------------------
def _find_layers(problem: Problem) -> list[_Layer]:
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
        layer = found.setdefault(path, _Layer(path, module, None, None))
        setattr(layer, attr, name)
    if bad:
        raise ConfigError(
            f"solver.name: ekfac factors only Linear and Conv2d layers; these selected parameters belong to other"
            f" layer types: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}",
            hint="exclude them with params: last_layer or params: [list of parameter-name prefixes], or use"
                 " solver.name: arnoldi or cg")
    return list(found.values())


@contextmanager
def _capture(layers: list[_Layer]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Forward hooks recording each layer's features (B, T, in') and output (a tensor autograd can
    differentiate to); always removed on exit. The model and its parameters are left untouched."""
    records: dict[str, tuple[Tensor, Tensor]] = {}

    def make(layer: _Layer):  # noqa: ANN202
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if layer.path in records:
                raise ConfigError(f"solver.name: ekfac needs each layer called once per forward; {layer.path} is"
                                  " called more often (shared weights)", hint="exclude it with params: [prefixes]")
            s = output if output.requires_grad else output.detach().requires_grad_()
            records[layer.path] = (layer.features(inputs[0].detach()), s)
            return s.clone()  # downstream in-place ops must not overwrite the tensor we differentiate to

        return hook

    handles = [layer.module.register_forward_hook(make(layer)) for layer in layers]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


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


def _plan(problem: Problem, layers: list[_Layer], records: dict[str, tuple[Tensor, Tensor]], x: Tensor,
          opts: EkfacConfig | None) -> tuple[str, int]:
    """Forward one row: (exact | sample, rows per chunk so that features and m pseudo-gradients of all layers
    stay under the gradient memory budget). opts None: one true gradient per row (self-influence)."""
    records.clear()
    with torch.no_grad():
        k = problem.model(x).reshape(len(x), -1).shape[1]
    missing = [layer.path for layer in layers if layer.path not in records]
    if missing:
        raise ConfigError(f"solver.name: ekfac: layers {', '.join(missing)} are not called in the forward pass",
                          hint="exclude their parameters with params: [list of prefixes]")
    mode = "exact" if opts is None else opts.output_factor
    if mode == "auto":
        mode = "exact" if k <= EXACT_MAX_OUTPUTS else "sample"
    m = 1 if opts is None else (k if mode == "exact" else opts.samples)
    per_row = sum(a.shape[1] * (a.shape[2] + m * layer.shape()[0]) for layer in layers
                  for a in [records[layer.path][0]])
    records.clear()
    return mode, max(1, BLOCK_BYTES // (4 * per_row * x.element_size()))


def _split(loader: Iterable[tuple[Tensor, Tensor, Tensor]], rows: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The loader's batches, cut into chunks of at most `rows` rows."""
    for idx, x, y in loader:
        for s in range(0, len(x), rows):
            yield idx[s : s + rows], x[s : s + rows], y[s : s + rows]


def _pseudo_gradients(problem: Problem, layers: list[_Layer], records: dict[str, tuple[Tensor, Tensor]],
                      mode: str, samples: int, rows: int) -> Iterator[tuple[Tensor, list[Tensor], list[Tensor]]]:
    """Per chunk of rows: (x, features per layer (B, T, in'), pseudo-gradients per layer (m, B, T, out)).
    Sampled cotangents come from a generator seeded with problem.seed, the same draws on every pass."""
    gen = torch.Generator(device=problem.device).manual_seed(problem.seed)
    for _, x, _y in _split(problem.train_loader, rows):
        records.clear()
        x = x.to(problem.device)
        out = problem.model(x)
        cot = _cotangents(problem, out, mode, samples, gen)
        s_list = [records[layer.path][1] for layer in layers]
        grads = _pullback(out, s_list, cot.reshape(cot.shape[0], *out.shape))
        feats = [records[layer.path][0] for layer in layers]
        pseudo = [layer.out_grads(g.flatten(0, 1)).unflatten(0, g.shape[:2]) if g is not None
                  else a.new_zeros(cot.shape[0], *a.shape[:2], layer.shape()[0])
                  for layer, a, g in zip(layers, feats, grads, strict=True)]
        records.clear()
        yield x, feats, pseudo


def _pullback(out: Tensor, inputs: list[Tensor], cotangents: Tensor) -> list[Tensor | None]:
    """d<out, cotangent>/d input for each of the m cotangents (m, *out.shape) -> (m, *input.shape) per input:
    one vmapped backward (is_grads_batched), or m backward passes when an op has no batching rule."""
    try:
        return list(torch.autograd.grad(out, inputs, cotangents, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True))
    except RuntimeError:
        cols = [torch.autograd.grad(out, inputs, c, retain_graph=True, allow_unused=True) for c in cotangents]
        return [None if col[0] is None else torch.stack(col) for col in zip(*cols, strict=True)]


def _sum_squared_projections(layer: _Layer, a: Tensor, gs: Tensor) -> Tensor:
    """sum over rows and pseudo-gradients of (U_S^T G U_A)^2, G = sum_t g_t a_t^T; (out, in') float64.
    a: (B, T, in'), gs: (m, B, T, out)."""
    u_a, u_s = _fitted(layer.u_a).to(a.dtype), _fitted(layer.u_s).to(a.dtype)
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


def _quadratic_form(layer: _Layer, a: Tensor, g: Tensor) -> Tensor:
    """Per row: sum_kl (U_S^T G U_A)_kl^2 / diag_kl, G = sum_t g_t a_t^T. a: (B, T, in'), g: (B, T, out) -> (B,)."""
    diag = _fitted(layer.diag)
    a_rot, g_rot = a @ _fitted(layer.u_a).to(a.dtype), g @ _fitted(layer.u_s).to(g.dtype)
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


def _finish(layers: list[_Layer], problem: Problem) -> dict[str, Any]:
    """diag = lambda + weight_decay + damping per layer, floored at EIGEN_FLOOR x its max; the describe() dict."""
    shift, n = problem.objective.weight_decay + problem.damping, problem.n
    floored, info = 0, []
    for layer in layers:
        diag = _fitted(layer.corrected) / n + shift
        floor = EIGEN_FLOOR * float(diag.max())
        floored += int((diag < floor).sum())
        layer.diag, layer.corrected = diag.clamp_min(floor), None
        out, inp = layer.shape()
        info.append({"module": layer.path, "type": type(layer.module).__name__, "out": out, "in": inp,
                     "bias": layer.bias is not None, "positions_per_row": layer.positions // n,
                     "eig_min": float(layer.diag.min()), "eig_max": float(layer.diag.max())})
    res: dict[str, Any] = {
        "curvature": "Gauss-Newton, block-diagonal per layer, Kronecker eigenbasis", "damping": problem.damping,
        "weight_decay": problem.objective.weight_decay, "eig_min": min(i["eig_min"] for i in info),
        "eig_max": max(i["eig_max"] for i in info), "floored_eigenvalues": floored, "layers": info}
    if floored:
        res["warnings"] = [f"ekfac: {floored} eigenvalues below {EIGEN_FLOOR:g} x the largest were raised to it;"
                           " raise solver.damping or weight_decay"]
    return res


def _tick(progress: Progress | None, done: int, total: int) -> int:
    if progress is not None:
        progress(done, total)
    return done


def _conv_padding(m: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) for F.pad, for int, 'valid' and 'same' paddings."""
    if m.padding == "valid":
        return (0, 0, 0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = m.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def _fitted(value: Tensor | None) -> Tensor:
    """A layer factor that `fit` computes; NotFittedError (not an assert, which -O removes) before."""
    if value is None:
        raise NotFittedError("solver ekfac: call fit() before using it")
    return value
