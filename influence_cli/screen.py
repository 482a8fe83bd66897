"""A bfloat16 screen for `rank`'s per-test-row top K: the (T, p) x (p, B) product at bfloat16 speed, top K as float32's.

`rank` needs, for each held test-side solve h_t (T of them, float32) and each streamed block of training gradients
g_i (B, p), every pair's score h_t . g_i / n, but keeps only each test row's K largest and K smallest (and the mean
row, scored apart in float64). The screen computes the block's product in bfloat16 (2.4-2.6x faster than float32 on
a CPU with AVX512-BF16, more on GPUs), bounds each pair's error, and scores exactly (float32, as before) only the
pairs whose bound reaches the running K-th value of their test row; every other pair provably-with-high-probability
cannot enter the top K, so helpful.csv and harmful.csv are those of the float32 product.

The bound. Both operands are rounded to bfloat16 *stochastically* (a fixed-seed dither added to the float32 bits,
the high half kept): each rounded value is one of the two bfloat16 neighbours, unbiased, within 2u|x| (u = 2^-8), and
the rounding errors are independent of each other and of the data by construction (round-to-nearest errors are
not: equal or patterned values round alike). The terms h~_j g~_j - h_j g_j of a pair are then independent, zero
mean, each in a range of width <= 4u(1+2u)|h_j g_j|, so by Hoeffding's inequality
    P(|h~ . g~ - h . g| >= c sqrt(sum_j h_j^2 g_j^2)) <= MISS,  c = 4u(1+2u) sqrt(ln(2/MISS) / 2),
and sum_j h_j^2 g_j^2 <= sum_chunks |h_c|_4^2 |g_c|_4^2 (Cauchy-Schwarz on chunks of CHUNK consecutive coordinates:
one (T, C) x (C, B) product, C = p / CHUNK). Added to it: the rounding of the bfloat16 result (<= u/(1-u) of it,
exact) and float32 accumulation inside the matmul, ACCUMULATION sqrt(p) 2^-24 |h||g| (what blocked float32 sums
show; the float32 path carries the same error without a bound). MISS = 1e-12 per pair: over the 5e7 pairs of a
50k x 1k run, a changed top K has probability below 5e-5 even if every pair sat at its row's threshold.

`auto` (config `rank.screen`) uses it when the run is float32, the product is large (2 T p n >= MIN_FLOPS) and a
calibration on the device (bfloat16 vs float32
matmul, plus the rounding and chunk norms per gradient entry, ~0.1 s) predicts at most MAX_COST_RATIO of the float32
block cost for this many test rows; `true` always (float32 runs), `false` never.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

U = 2.0**-8  # bfloat16 unit roundoff
MISS = 1e-12  # probability that one pair's bfloat16 error exceeds its bound
HOEFFDING = 4 * U * (1 + 2 * U) * math.sqrt(math.log(2 / MISS) / 2)
ACCUMULATION = 2.0  # float32 accumulation allowance: this x sqrt(p) 2^-24 |h| |g|
SLACK = 1.0 + 2.0**-10  # covers the float32 rounding of the bound's own pieces (positive sums of a few terms)
CHUNK = 64  # coordinates per Cauchy-Schwarz chunk
COLUMNS = 8192  # columns per elementwise pass (a multiple of CHUNK)
PAIR_COST = 32  # score candidate columns densely (T x p each) once they hold >= T / PAIR_COST candidates on average
MAX_COST_RATIO = 0.7  # auto: screen when predicted to cost at most this fraction of the float32 product
MIN_ROWS = 32  # auto: fewer test rows than this never pay for the per-entry rounding
MIN_FLOPS = 1e11  # auto: a product of fewer flops (2 T p n: ~1 s in float32 on one core) is not worth calibrating


def stochastic_bf16(x: Tensor, dither: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """bfloat16 of float32 `x` (2-D), each entry rounded up with probability equal to the fraction its truncation
    drops (unbiased, independent per entry): `dither` (int16, x's shape, uniform) is added to the float32 bits and
    the high 16 bits kept; without one, a fresh dither is drawn from `generator` for each column chunk."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.int16, device=x.device)
    bits = x.view(torch.int32)
    for c in range(0, cols, COLUMNS):
        part = slice(c, min(c + COLUMNS, cols))
        d = dither[:, part] if dither is not None else _dither((rows, part.stop - c), x.device, generator)
        tmp = bits[:, part] + d  # int32
        tmp.add_(1 << 15).bitwise_right_shift_(16)  # dither + 2^15 in [0, 2^16)
        out[:, part] = tmp
    return out.view(torch.bfloat16)


def _dither(shape: tuple[int, int], device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, generator=generator).to(device)


def chunk_norms(x: Tensor) -> Tensor:
    """(rows, ceil(p / CHUNK)) float32: |x_c|_4^2 = sqrt(sum_{j in c} x_j^4) of each chunk c of CHUNK consecutive
    coordinates."""
    rows, cols = x.shape
    out = torch.empty(rows, -(-cols // CHUNK), dtype=torch.float32, device=x.device)
    for c in range(0, cols, COLUMNS):
        part = x[:, c : min(c + COLUMNS, cols)].float().square()
        width = part.shape[1]
        full = width - width % CHUNK
        first = c // CHUNK
        if full:
            out[:, first : first + full // CHUNK] = torch.linalg.vector_norm(
                part[:, :full].view(rows, -1, CHUNK), dim=2)
        if full < width:
            out[:, -1] = torch.linalg.vector_norm(part[:, full:], dim=1)
    return out


@dataclass
class Screen:
    """The held solves (T, p) float32 and their bfloat16 copy, per-chunk 4-norms and norms; `scores` screens one
    block of training gradients. `stats` counts pairs and how they were scored."""

    held: Tensor
    rounded: Tensor
    held_chunks: Tensor
    held_norms: Tensor
    dither: Tensor
    stats: dict[str, int] = field(default_factory=lambda: {"pairs": 0, "rescored": 0, "dense_blocks": 0,
                                                          "screened_blocks": 0})

    @classmethod
    def build(cls, held: Tensor, block_rows: int, seed: int = 0) -> Screen:
        gen = torch.Generator().manual_seed(seed)
        rounded = stochastic_bf16(held, generator=gen)
        dither = _dither((block_rows, held.shape[1]), held.device, gen)
        return cls(held, rounded, chunk_norms(held), torch.linalg.vector_norm(held, dim=1), dither)

    def bounds(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        """(bfloat16 estimate of held @ grads.T (T, B) float32, its error bound (T, B)): the bound holds for each
        pair with probability >= 1 - MISS (module docstring)."""
        rows, p = grads.shape
        if rows > len(self.dither):  # a larger block than planned: more dither rows, from the same stream
            gen = torch.Generator().manual_seed(len(self.dither))
            more = _dither((rows - len(self.dither), p), grads.device, gen)
            self.dither = torch.cat([self.dither, more])
        g = stochastic_bf16(grads, self.dither[:rows])
        approx = (self.rounded @ g.T).float()
        spread = (self.held_chunks @ chunk_norms(grads).T).clamp_min_(0).sqrt_()
        norms = torch.linalg.vector_norm(grads, dim=1)
        margin = HOEFFDING * spread
        margin += (U / (1 - U)) * approx.abs()
        margin += (ACCUMULATION * math.sqrt(p) * 2.0**-24) * self.held_norms[:, None] * norms[None, :]
        return approx, margin.mul_(SLACK)

    def scores(self, grads: Tensor, scale: float, k: int, above: Tensor, below: Tensor, factors: Any = None
               ) -> tuple[Tensor, Tensor]:
        """(scores for the largest side (T, B): held @ grads.T * scale in float32 where a pair can reach its test row's
        top k, -inf elsewhere; the same for the smallest side, +inf elsewhere). `above` / `below` (T,): the K-th
        largest / smallest score the row already holds (-inf / +inf before any); the block's own bounds raise them
        (k pairs whose lower bounds exceed a value put the top k above it)."""
        approx, margin = self.bounds(grads)
        return rescore(self.held, grads, approx, margin, scale, k, above, below, self.stats)


def rescore(held: Tensor, grads: Tensor, approx: Tensor, margin: Tensor, scale: float, k: int, above: Tensor,
            below: Tensor, stats: dict[str, int]) -> tuple[Tensor, Tensor]:
    """A screen's answer from its estimate `approx` (T, B) of held @ grads.T and a bound `margin` (T, B) on its
    error (both consumed): held @ grads.T * scale in float32 where a pair can reach its test row's top k, -inf
    elsewhere (largest side); the same with +inf (smallest side). See Screen.scores for `above` / `below`."""
    t_count, rows = held.shape[0], grads.shape[0]
    approx.mul_(scale)
    margin.mul_(abs(scale))
    upper, lower = approx + margin, approx.sub_(margin)
    if k <= rows:
        above = torch.maximum(above, torch.topk(lower, k, dim=1).values[:, -1])
        below = torch.minimum(below, torch.topk(upper, k, dim=1, largest=False).values[:, -1])
    high = upper >= above[:, None]
    low = lower <= below[:, None]
    wanted = high | low
    count = int(wanted.sum())
    stats["pairs"] += t_count * rows
    stats["rescored"] += count
    exact = torch.full((t_count, rows), math.nan, dtype=held.dtype, device=held.device)
    if count:
        cols = wanted.any(0).nonzero().flatten()
        if count * PAIR_COST >= t_count * len(cols):  # many candidates per column: those columns densely
            exact[:, cols] = (held @ grads[cols].T) * scale
            stats["dense_blocks"] += 1
        else:  # per test row, its candidate columns against its held solve (one read of each)
            t_idx, i_idx = wanted.nonzero(as_tuple=True)  # row-major: grouped by test row
            values = torch.empty(count, dtype=held.dtype, device=held.device)
            rows_, counts = torch.unique_consecutive(t_idx, return_counts=True)
            start = 0
            for t, c in zip(rows_.tolist(), counts.tolist(), strict=True):
                values[start : start + c] = torch.mv(grads.index_select(0, i_idx[start : start + c]), held[t])
                start += c
            exact[t_idx, i_idx] = values * scale
            stats["screened_blocks"] += 1
    return exact.masked_fill(~high, -math.inf), exact.masked_fill_(~low, math.inf)


def plan(mode: str | bool, held_dtype: torch.dtype, test_rows: int, p: int, n: int, device: torch.device
         ) -> tuple[bool, dict]:
    """(use the screen, what the summary says): see the module docstring for `mode`."""
    info: dict[str, Any] = {"mode": mode}
    if mode is False:
        return False, {**info, "used": False, "reason": "rank.screen: false"}
    if held_dtype != torch.float32:
        return False, {**info, "used": False, "reason": "the run is float64 (dtype): scores stay float64"}
    if mode is True:
        return True, {**info, "used": True, "miss_probability_per_pair": MISS}
    if test_rows < MIN_ROWS:
        return False, {**info, "used": False, "reason": f"{test_rows} test rows (< {MIN_ROWS})"}
    if 2.0 * test_rows * p * n < MIN_FLOPS:
        return False, {**info, "used": False, "reason": f"a small product (2 T p n = {2.0 * test_rows * p * n:.2g} flops)"}
    ratio, costs = calibrate(test_rows, p, device)
    info.update(predicted_cost_ratio=round(ratio, 3), **costs)
    if ratio > MAX_COST_RATIO:
        return False, {**info, "used": False,
                       "reason": f"predicted {ratio:.2f}x the float32 product on this device (> {MAX_COST_RATIO})"}
    return True, {**info, "used": True, "miss_probability_per_pair": MISS}


def calibrate(test_rows: int, p: int, device: torch.device, width: int = 16384, rows: int = 256
              ) -> tuple[float, dict[str, float]]:
    """(predicted screen cost / float32 cost per training block, the measured pieces): the float32 and bfloat16
    matmuls of min(T, 512) test rows x `width` coordinates x `rows` training rows (scaled to T test rows), and the
    rounding and bound pieces of the (rows, width) gradient block, which do not grow with T; best of 3 each."""
    gen = torch.Generator().manual_seed(0)
    t_cal, width = min(test_rows, 256), min(width, max(p, COLUMNS))
    h = torch.randn(t_cal, width, generator=gen).to(device)
    g = torch.randn(rows, width, generator=gen).to(device)
    hb, dither = h.bfloat16(), _dither((rows, width), device, gen)

    def best(fn: Any) -> float:
        fn()  # warm: allocations, kernel selection
        times = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    gb = stochastic_bf16(g, dither)
    f32 = best(lambda: h @ g.T) * test_rows / t_cal
    bf16 = best(lambda: hb @ gb.T) * test_rows / t_cal
    extra = best(lambda: (stochastic_bf16(g, dither), chunk_norms(g), torch.linalg.vector_norm(g, dim=1)))
    ratio = (bf16 + extra) / max(f32, 1e-12)
    return ratio, {"float32_block_s": round(f32, 5), "bfloat16_block_s": round(bf16, 5),
                   "rounding_and_bound_block_s": round(extra, 5)}
