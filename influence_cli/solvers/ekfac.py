"""EK-FAC solver (George et al. 2018; Grosse et al. 2023): Kronecker-factored, eigenvalue-corrected curvature.

Method. H is approximated block-diagonally, one block per nn.Linear / nn.Conv2d layer among the selected
parameters. A layer's per-example gradient is G = sum_t g_t a_t^T (out, in'): a_t the layer input at position
t (conv: an unfolded patch) with a trailing 1 when its bias is selected (homogeneous coordinates), g_t the
gradient at the layer output. With the Gauss-Newton factorization of the output Hessian Lambda = B B^T
(softmax CE: B = diag(sqrt p) - p sqrt(p)^T; logistic: sqrt(s(1-s)); MSE over k outputs: sqrt(2/k) I), each
column of B, pulled back through the network, is a pseudo-gradient g_c whose sum_c g_c g_c^T equals the GN's
output factor exactly (`output_factor: sample` draws B z, z ~ N(0, I), instead: an unbiased Monte-Carlo GN).
  pass 1:  A = mean_(rows, real positions) a a^T (a text batch's padding is masked out),  S = (1/n) sum_rows sum_c sum_t g g^T,  A = U_A diag U_A^T, S = ...
  pass 2:  lambda_kl = (1/n) sum_rows sum_c ((U_S^T G_c U_A)_kl)^2     (the eigenvalue correction; K-FAC: s_k a_l)
  H_layer ~= (U_S x U_A) diag(lambda + weight_decay + damping) (U_S x U_A)^T  =: M^-1.
For one Linear layer with MSE, S is constant and the correction makes this equal to H exactly.
Refinement (`refine` = r > 0, `ihvp` only): block CG on A = H + (weight_decay + damping) I, applied by exact
full-data HVPs (`GradientSource.hvp`: problem.hessian, exact or Gauss-Newton, weight decay and damping added
once: the matrix every solver inverts, README "Solvers"), preconditioned by M. It keeps, per solve, the
answer of smallest residual (M v included) and keeps M v where A shows non-positive curvature (refine.py). Its first step is the EK-FAC answer M v
(rescaled); r more steps refine it, r + 1 HVP passes in all (see refine.py), which brings train->test
influence, where the block-diagonal approximation is weakest, close to the exact solve. A fixed number of CG steps is not exactly linear in v (the step sizes depend on v):
ihvp(a + b) = ihvp(a) + ihvp(b) only up to each solve's remaining error. `half_ihvp` and
`self_influence_blocks` stay the pure factored M (self-influence of every row must not cost HVPs per row).

Cost: two passes over the training rows, each one forward and m backward passes (m = outputs, or `samples`),
plus projections of ~ n m (out^2 + in^2) per layer; eigendecompositions ~ out^3 + in^3. Memory: the factors,
sum over layers of out^2 + in^2 + out in floats (float64), independent of n.
M v and half_ihvp: two small matmuls per layer per vector, (k, p) -> (k, p) float64. ihvp with refine r adds
r + 1 full-data HVP passes per call (all k vectors in each pass, ~4 n p flops per vector) and ~5 (k, p)
float64 arrays. `self_influence_blocks` scores rows from layer inputs and output gradients only (for a Linear
layer G = g a^T, so the quadratic form is sum_kl (U_S^T g)_k^2 (U_A^T a)_l^2 / lambda_kl): it never forms the
p-sized per-example gradient, and never runs an HVP per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

from .. import distributed
from ..config import SolverConfig
from ..errors import DataError
from ..gradients import GradientSource
from ..objective import Problem
from .base import Cost, Progress, require_fitted
from .ekfac_layers import (
    Layer,
    ScoredBlock,
    capture,
    counted,
    find_layers,
    fitted,
    plan,
    position_mask,
    pseudo_gradients,
    scored_blocks,
    sum_squared_projections,
)
from .refine import RefineLog, refine

EIGEN_FLOOR = 1e-10


class EkfacSolver:
    name: ClassVar[str] = "ekfac"

    def __init__(self, config: SolverConfig) -> None:
        self.config = config
        self._layers: list[Layer] | None = None
        self._problem: Problem | None = None
        self._source: GradientSource | None = None
        self._info: dict[str, Any] = {}
        self._refined = RefineLog("ekfac")

    @classmethod
    def estimate(cls, config: SolverConfig, n: int, p: int) -> Cost:
        # Layer shapes are unknown here: assume square-ish layers, out ~ in ~ sqrt(p), and 10 outputs.
        side = max(1.0, p**0.5)
        m = 10 if config.ekfac.output_factor != "sample" else config.ekfac.samples
        passes = 2 if config.ekfac.correct_eigenvalues else 1
        return Cost(memory_bytes=int(8 * 3 * p + 2**27),
                    fit_flops=passes * n * (2 + 2 * m) * (p + 2 * side * side) + 4 * side**3,
                    note="Kronecker factors per Linear/Conv2d layer, float64; memory independent of n;"
                         f" ihvp: {config.ekfac.refine + 1 if config.ekfac.refine else 0} full-data HVP passes"
                         " per call (solver.ekfac.refine), self-influence none")

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self, problem: Problem, progress: Progress | None = None) -> Self:
        layers, opts, n = find_layers(problem), self.config.ekfac, problem.n
        total, done = (2 if opts.correct_eigenvalues else 1) * n, 0
        with torch.enable_grad(), capture(layers) as records:
            first = next(iter(problem.train_loader))[1][:1].to(problem.device)
            mode, rows = plan(problem, layers, records, first, opts)
            for layer in layers:
                out, inp = layer.shape()
                layer.a_cov = torch.zeros(inp, inp, dtype=torch.float64, device=problem.device)
                layer.s_cov = torch.zeros(out, out, dtype=torch.float64, device=problem.device)
            for x, feats, pseudo in pseudo_gradients(problem, layers, records, mode, opts.samples, rows):
                for layer, a, gs in zip(layers, feats, pseudo, strict=True):
                    a64 = a.reshape(-1, a.shape[2]).double()
                    layer.a_cov += a64.T @ a64
                    layer.positions += counted(a, position_mask(problem, x))  # padded tokens do not count
                    g64 = gs.reshape(-1, gs.shape[-1]).double()
                    layer.s_cov += g64.T @ g64
                done = _tick(progress, done + len(x), total)
            distributed.sum_attributes(layers, "a_cov", "s_cov", "positions")  # torchrun: over all ranks
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
                for x, feats, pseudo in pseudo_gradients(problem, layers, records, mode, opts.samples, rows):
                    for layer, a, gs in zip(layers, feats, pseudo, strict=True):
                        layer.corrected += sum_squared_projections(layer, a, gs)
                    done = _tick(progress, done + len(x), total)
                distributed.sum_attributes(layers, "corrected")
        self._info = _finish(layers, problem)
        self._info.update(output_factor=mode, correct_eigenvalues=opts.correct_eigenvalues)
        self._layers, self._problem, self._source = layers, problem, GradientSource(problem)
        self._refined = RefineLog("ekfac")
        return self

    def state(self) -> dict[str, Any]:
        layers = require_fitted(self, "_layers")
        keep = ("positions", "u_a", "u_s", "a_val", "s_val", "diag")
        return {"layers": {layer.path: {k: getattr(layer, k) for k in keep} for layer in layers}, "info": self._info}

    def load_state(self, state: dict[str, Any], problem: Problem) -> Self:
        """The fitted factors of `state` on this problem's layers (the same model, so the same layers)."""
        layers = find_layers(problem)
        for layer in layers:
            for k, v in state["layers"][layer.path].items():
                setattr(layer, k, v.to(problem.device) if isinstance(v, Tensor) else v)
        self._info = state["info"]
        self._layers, self._problem, self._source = layers, problem, GradientSource(problem)
        self._refined = RefineLog("ekfac")
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

    def factored_ihvp(self, v: Tensor) -> Tensor:
        """M v = (H_ekfac + (weight_decay + damping) I)^-1 v, the pure factored form (what `half_ihvp` squares
        to, and refine's preconditioner): v (k, p) -> (k, p) float64, no pass over the data."""
        rotated = self._apply(v, -1.0)
        problem: Problem = require_fitted(self, "_problem")
        layers = require_fitted(self, "_layers")
        shapes = dict(zip(problem.params.names, problem.params.shapes, strict=True))
        out: dict[str, Tensor] = {}
        for layer, mat in zip(layers, rotated, strict=True):
            out.update(layer.scatter(layer.u_s @ mat @ layer.u_a.T, shapes))
        return problem.params.flatten(out, batched=True)

    def ihvp(self, v: Tensor) -> Tensor:
        """(H + (weight_decay + damping) I)^-1 v for v (k, p) -> (k, p) float64: `factored_ihvp` when
        solver.ekfac.refine is 0, else EK-FAC-preconditioned CG on exact HVPs refining M v by `refine` steps
        (refine + 1 full-data HVP passes, all k columns in each). Linear in v only up to the remaining error of
        each solve (see the module docstring); describe() reports residuals before and after."""
        if self.config.ekfac.refine == 0:
            return self.factored_ihvp(v)
        source: GradientSource = require_fitted(self, "_source")
        b = v.to(device=source.problem.device, dtype=torch.float64)
        return refine(source.hvp, self.factored_ihvp, b, self.config.ekfac.refine, self._refined)

    def half_ihvp(self, v: Tensor) -> Tensor:
        """A v = diag^-1/2 (U_S x U_A)^T v per layer, so ||A g||^2 = g^T H_ekfac^-1 g. (k, p) -> (k, p) float64
        (coordinates in the eigenbasis, layer after layer). Costs (out^2 in' + out in'^2) per row and layer:
        for many training rows prefer `self_influence_blocks`. Always the pure factored form: solver.ekfac.refine
        does not apply (||A g||^2 = g^T `factored_ihvp`(g), which may differ from g^T `ihvp`(g))."""
        rotated = self._apply(v, -0.5)
        return torch.cat([r.reshape(r.shape[0], -1) for r in rotated], dim=1)

    def self_influence_blocks(self, loader: Iterable[tuple[Tensor, Tensor, Tensor]], progress: Progress | None = None,
                              total: int | None = None, ids: Sequence[str] | None = None) -> Iterator[ScoredBlock]:
        """g_i^T H_ekfac^-1 g_i of each row of `loader`, from one forward and one backward per batch and the
        layers' inputs and output gradients; the (B, p) per-example gradient is never formed. The pure factored
        form, as `half_ihvp`: solver.ekfac.refine does not apply (it would cost HVP passes per row). Peak memory:
        a batch's activations plus (B, out, in') for conv/sequence layers, chunked. DataError (naming `ids`, or
        row numbers) when a loss is NaN/inf."""
        yield from scored_blocks(require_fitted(self, "_problem"), require_fitted(self, "_layers"), loader, progress,
                                 total, ids)

    def self_influence_fast(self, loader: Iterable[tuple[Tensor, Tensor, Tensor]], n: int,
                            progress: Progress | None = None) -> Tensor:
        """Self-influence of every row of `loader` as an (n,) float64 tensor indexed by row_idx."""
        res = torch.zeros(n, dtype=torch.float64)
        for block in self.self_influence_blocks(loader, progress, n):
            res[block.idx] = block.self_influence.cpu()
        return res

    def describe(self) -> dict[str, Any]:
        return self._refined.describe({"name": self.name, **self._info}, self.config.ekfac.refine)




# ---- helpers -------------------------------------------------------------------------------------
def _finish(layers: list[Layer], problem: Problem) -> dict[str, Any]:
    """diag = lambda + weight_decay + damping per layer, floored at EIGEN_FLOOR x its max; the describe() dict."""
    shift, n = problem.objective.weight_decay + problem.damping, problem.n
    floored, info = 0, []
    for layer in layers:
        diag = fitted(layer.corrected) / n + shift
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
