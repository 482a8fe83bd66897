"""A low-rank screen for `rank`'s per-test-row top K: exact top K at a fraction of the (T, p) x (p, B) product.

For a Linear layer on 2-D input a training row's gradient is r a'^T (out, in'), a' its input with a 1 appended for
the bias, so its part of a pair's score is r^T M_t a' with M_t (out, in') that layer's part of the held solve
H^-1 g_t. The held solves of a layer are numerically low rank (EK-FAC's: sigma_4 / sigma_1 ~ 1e-3 on the
benchmark MLP), so M_t ~ Q_t B_t with Q_t (out, k) orthonormal and B_t = Q_t^T M_t (k, in') costs 2 k (out + in')
per pair instead of 2 out in'. The error of that estimate is bounded, per pair and deterministically, by
    |r^T (M_t - Q_t B_t) a'| <= ||M_t - Q_t B_t||_F ||r|| ||a'||
with the residual's Frobenius norm computed in float64 from the float32 factors actually used (so the bound does
not rely on how well the range finder did), plus float32 accumulation: gamma_n = n u / (1 - n u) (u = 2^-24) for
the dot products of length out, in' and k, times ||r|| ||a'|| sum_j ||q_j|| ||b_j||. Parameters outside such layers
(layers on sequences or images, small layers where low rank saves nothing) are scored by their exact float32
product. The pairs whose bound reaches their test row's running K-th value are rescored by the float32 product
(screen.rescore), so helpful.csv and harmful.csv are those of the float32 product, with no probability of a miss.

k per layer: a randomized range finder (Halko et al. 2011: one power iteration) grows k from MIN_RANK, doubling,
until the residual of 90% of the test rows is under RESIDUAL_TOL of their ||M_t||_F, or k reaches the size where
low rank stops paying (k (out + in') >= out in' / MIN_SAVING). `build` returns None when the whole screen is
not predicted to cost at most MAX_COST_RATIO of the float32 product in flops; `rank` then uses the bfloat16
screen where that pays, or the plain product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .screen import ACCUMULATION, MIN_FLOPS, MIN_ROWS, SLACK, rescore

U32 = 2.0**-24  # float32 unit roundoff
MIN_RANK = 8
RESIDUAL_TOL = 1e-2  # relative Frobenius residual of a layer's held solves at which its rank stops growing
MIN_SAVING = 4.0  # a layer is screened by low rank only when k (out + in') <= out in' / MIN_SAVING
MAX_COST_RATIO = 0.5  # the screen is used only when predicted at most this fraction of the product's flops
ROW_CHUNK = 64  # test rows per float64 range-finder step (bounds its memory: ROW_CHUNK x out x in' float64)
QUANTILE = 0.9  # the share of test rows whose residual must be under RESIDUAL_TOL at the chosen k


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


@dataclass
class _Layer:
    """One screened layer: its columns, the factors of every held solve's part and their bound pieces."""

    path: str
    weight: slice
    bias: slice | None
    out: int
    inputs: int  # in (without the bias column)
    rank: int
    left: Tensor  # (out, T * k) float32: Q_t for each test row, side by side
    right: Tensor  # (in', T * k) float32: B_t^T
    residual: Tensor  # (T,) float32, rounded up: ||M_t - Q_t B_t||_F
    accumulation: Tensor  # (T,) float32: gamma(out + in' + k + 2) sum_j ||q_j|| ||b_j||


@dataclass
class LowRankScreen:
    """The held solves (T, p) float32, the screened layers' factors, the other columns' held values. `scores` screens
    one block of training gradients given its layer factors (Block.factors)."""

    held: Tensor
    layers: list[_Layer]
    rest: Tensor  # (r,) long: columns scored exactly
    held_rest: Tensor  # (T, r)
    held_norms: Tensor  # (T,)
    stats: dict[str, int] = field(default_factory=lambda: {"pairs": 0, "rescored": 0, "dense_blocks": 0,
                                                          "screened_blocks": 0, "exact_layer_blocks": 0})

    @classmethod
    def build(cls, held: Tensor, layers: Any, slots: dict[str, slice], seed: int = 0) -> tuple[LowRankScreen | None,
                                                                                                 dict[str, Any]]:
        """(the screen, or None when it would not save MAX_COST_RATIO of the flops; what the summary says)."""
        t_count, p = held.shape
        gen = torch.Generator().manual_seed(seed)
        chosen: list[_Layer] = []
        tried = 0
        covered = torch.zeros(p, dtype=torch.bool)
        for layer in layers:
            if not isinstance(layer.module, nn.Linear) or not layer.weight:
                continue
            out, inputs = layer.module.weight.shape
            wide = inputs + (1 if layer.bias else 0)
            cap = int(out * wide / (MIN_SAVING * (out + wide)))
            if cap < MIN_RANK:
                continue
            tried += 1
            found = _factor(held, slots[layer.weight], slots[layer.bias] if layer.bias else None, out, inputs, cap,
                            gen)
            if found is None:
                continue
            chosen.append(_Layer(layer.path, slots[layer.weight], slots[layer.bias] if layer.bias else None, out,
                                 inputs, *found))
            covered[slots[layer.weight]] = True
            if layer.bias:
                covered[slots[layer.bias]] = True
        rest = (~covered).nonzero().flatten().to(held.device)
        flops = sum(layer.rank * (layer.out + layer.inputs + 1) for layer in chosen) + len(rest)
        ratio = flops / p
        info: dict[str, Any] = {"kind": "low_rank", "predicted_cost_ratio": round(ratio, 4),
                                "ranks": {layer.path: layer.rank for layer in chosen}}
        if not chosen or ratio > MAX_COST_RATIO:
            why = ("no Linear layer large enough to screen by low rank" if not tried else
                   f"the held solves are not low rank enough (predicted {ratio:.2f}x the product's flops, >"
                   f" {MAX_COST_RATIO})")
            return None, {**info, "used": False, "reason": why}
        screen = cls(held, chosen, rest, held.index_select(1, rest), torch.linalg.vector_norm(held, dim=1))
        return screen, {**info, "used": True, "miss_probability_per_pair": 0.0}

    def bounds(self, grads: Tensor, factors: Any) -> tuple[Tensor, Tensor]:
        """(estimate of held @ grads.T (T, B) float32, a deterministic bound on its error (T, B))."""
        rows, p = grads.shape
        t_count = self.held.shape[0]
        approx = self.held_rest @ grads.index_select(1, self.rest).T
        margin = torch.zeros_like(approx)
        by_path = {f[0].path: f for f in factors or ()}
        for layer in self.layers:
            got = by_path.get(layer.path)
            a, r = (got[1], got[2]) if got is not None else (None, None)
            if a is None or r is None or a.shape[1] != 1 or r.shape[1] != 1:  # no 2-D factors here: exactly
                cols = [layer.weight] + ([layer.bias] if layer.bias else [])
                for c in cols:
                    approx += self.held[:, c] @ grads[:, c].T
                self.stats["exact_layer_blocks"] += 1
                continue
            a, r = a[:, 0].to(approx.dtype), r[:, 0].to(approx.dtype)
            if layer.bias:
                a = torch.cat([a, a.new_ones(rows, 1)], 1)
            k = layer.rank
            part = (r @ layer.left).mul_(a @ layer.right).view(rows, t_count, k).sum(2)  # (B, T)
            approx += part.T
            sizes = torch.linalg.vector_norm(r, dim=1) * torch.linalg.vector_norm(a, dim=1)  # (B,)
            margin += (layer.residual + layer.accumulation)[:, None] * sizes[None, :]
        # the rest's float32 product and the float32 reference's own accumulation
        margin += (_gamma(len(self.rest) + 2 * len(self.layers) + 2) * torch.linalg.vector_norm(self.held_rest, dim=1)
                   )[:, None] * torch.linalg.vector_norm(grads.index_select(1, self.rest), dim=1)[None, :]
        # the float32 reference's own accumulation (as screen.py), and adding the layers' parts (each at most
        # ||h_t|| ||g_i||) in float32
        terms = len(self.layers) + 1
        margin += ((ACCUMULATION * math.sqrt(p) + terms * terms) * U32) * self.held_norms[:, None] * \
            torch.linalg.vector_norm(grads, dim=1)[None, :]
        return approx, margin.mul_(SLACK)

    def scores(self, grads: Tensor, scale: float, k: int, above: Tensor, below: Tensor, factors: Any = None
               ) -> tuple[Tensor, Tensor]:
        """As screen.Screen.scores, from the block's layer factors."""
        approx, margin = self.bounds(grads, factors)
        return rescore(self.held, grads, approx, margin, scale, k, above, below, self.stats)


def plan(mode: str | bool, held_dtype: torch.dtype, test_rows: int, p: int, n: int, factored: bool) -> bool:
    """Whether `rank` tries the low-rank screen (LowRankScreen.build decides on the held solves): `rank.screen`
    not false, a float32 run whose training gradients come from layer factors, and under auto a product large
    enough to matter (the bfloat16 screen's MIN_ROWS and MIN_FLOPS)."""
    if mode is False or held_dtype != torch.float32 or not factored:
        return False
    return mode is True or (test_rows >= MIN_ROWS and 2.0 * test_rows * p * n >= MIN_FLOPS)


def _factor(held: Tensor, weight: slice, bias: slice | None, out: int, inputs: int, cap: int,
            gen: torch.Generator) -> tuple[int, Tensor, Tensor, Tensor, Tensor] | None:
    """(k, left, right, residual, accumulation) of one layer's held solves (see _Layer), or None when no k <= cap
    brings QUANTILE of the rows under RESIDUAL_TOL."""
    t_count = held.shape[0]
    wide = inputs + (1 if bias is not None else 0)
    k = MIN_RANK
    while True:
        k = min(k, cap)
        probe = torch.randn(wide, k + 4, generator=gen, dtype=torch.float64).to(held.device)
        lefts, rights, residuals, relative, accs = [], [], [], [], []
        for lo in range(0, t_count, ROW_CHUNK):
            m = _matrices(held[lo : lo + ROW_CHUNK], weight, bias, out, inputs)  # (c, out, in') float64
            y = m @ probe
            y = m @ (m.transpose(1, 2) @ y)  # one power iteration
            q = torch.linalg.qr(y).Q[:, :, :k]  # (c, out, k)
            q32 = q.float()
            b32 = (q32.double().transpose(1, 2) @ m).float()  # (c, k, in')
            q64, b64 = q32.double(), b32.double()
            residual = torch.linalg.matrix_norm(m - q64 @ b64)  # (c,) Frobenius, of the factors as used
            lefts.append(q32)
            rights.append(b32.transpose(1, 2))
            residuals.append(residual)
            relative.append(residual / torch.linalg.matrix_norm(m).clamp_min(1e-300))
            accs.append((torch.linalg.vector_norm(q64, dim=1) * torch.linalg.vector_norm(b64, dim=2)).sum(1)
                        * _gamma(out + wide + k + 2))
        spread = float(torch.quantile(torch.cat(relative), QUANTILE))
        if spread <= RESIDUAL_TOL or k >= cap:
            break
        k *= 2
    if spread > RESIDUAL_TOL:
        return None
    left = torch.cat(lefts).permute(1, 0, 2).reshape(out, t_count * k).contiguous()
    right = torch.cat(rights).permute(1, 0, 2).reshape(wide, t_count * k).contiguous()
    return k, left, right, _up(torch.cat(residuals)), _up(torch.cat(accs))


def _up(x: Tensor) -> Tensor:
    """float64 -> float32, never below."""
    low = x.float()
    return torch.nextafter(low, torch.full_like(low, math.inf)).where(low.double() < x, low)


def _matrices(held: Tensor, weight: slice, bias: slice | None, out: int, inputs: int) -> Tensor:
    """(c, out, in') float64: each held solve's part of the layer, the bias as the last column."""
    w = held[:, weight].double().view(len(held), out, inputs)
    if bias is None:
        return w
    return torch.cat([w, held[:, bias].double().view(len(held), out, 1)], 2)
