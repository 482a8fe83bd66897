"""EK-FAC self-influence without per-example gradients, against the per-example gradients alone.

For a Linear layer a per-example gradient is the outer product g a^T, so g^T H_ekfac^-1 g =
sum_kl (U_S^T g)_k^2 (U_A^T a)_l^2 / lambda_kl: `EkfacSolver.self_influence_blocks` needs one forward and
one backward per batch and never forms the p-sized gradient. This script times, on random data and an
MLP 784 -> 1024 -> 256 -> 10 (1.07M parameters) by default:
  grads       GradientSource(problem).per_example over all rows (the p-sized gradients, discarded)
  fit         EkfacSolver.fit (two passes: factors, then the eigenvalue correction)
  self_inf    EkfacSolver.self_influence_fast over all rows
  half_ihvp   the generic route, ||A g||^2 from the p-sized gradients, on a few rows (extrapolated)
and the peak resident memory of each phase (VmHWM, reset between phases), at n and at n / 5.

    .venv/bin/python benchmarks/ekfac_speed.py --n 50000            # add --device cuda on a GPU machine
    .venv/bin/python benchmarks/ekfac_speed.py --n 50000 --grads-rows 10000   # gradients timed on 10k rows, scaled
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from influence_cli.config import SolverConfig
from influence_cli.gradients import GradientSource
from influence_cli.objective import Objective, ParamSpace, Problem
from influence_cli.solvers.ekfac import EkfacSolver


class RandomRows:
    """Re-iterable (row_idx, x, y) batches of fixed random data, generated batch by batch (memory ~ one batch)."""

    def __init__(self, n: int, d: int, classes: int, batch: int, seed: int = 0) -> None:
        self.n, self.d, self.classes, self.batch, self.seed = n, d, classes, batch, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for s in range(0, self.n, self.batch):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + s)
            rows = min(self.batch, self.n - s)
            yield (torch.arange(s, s + rows), torch.randn(rows, self.d, generator=g),
                   torch.randint(0, self.classes, (rows,), generator=g))


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    _reset_peak()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, _peak_mib(), out


def run(n: int, hidden: list[int], batch: int, device: torch.device, half_rows: int,
        grads_rows: int | None = None) -> dict[str, float]:
    """One measurement; per-example gradients are timed on the first `grads_rows` rows (default all) and
    scaled to n (their cost is linear in the rows)."""
    torch.manual_seed(0)
    sizes = [784, *hidden, 10]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device).eval().requires_grad_(False)
    loader = RandomRows(n, 784, 10, batch)
    problem = Problem(model, Objective("classification", 1e-3), ParamSpace.select(model, "all"), loader, n, 1e-3)
    source = GradientSource(problem)

    g_rows = min(grads_rows or n, n)

    def grads() -> float:
        total = 0.0
        for block in source.per_example(RandomRows(g_rows, 784, 10, batch)):
            total += float(block.grads[:, 0].sum())  # touch the block so nothing is skipped
        return total

    solver = EkfacSolver(SolverConfig(name="ekfac", damping=1e-3))
    t_grads, m_grads, _ = _timed(grads, device)
    t_grads *= n / g_rows
    t_fit, m_fit, _ = _timed(lambda: solver.fit(problem), device)
    t_si, m_si, si = _timed(lambda: solver.self_influence_fast(loader, n), device)
    few = RandomRows(half_rows, 784, 10, half_rows)
    few_grads = torch.cat([b.grads for b in source.per_example(few)])
    t_half, _, via_half = _timed(lambda: solver.half_ihvp(few_grads).square().sum(1), device)
    fast = solver.self_influence_fast(few, half_rows)
    agree = float((via_half.cpu() - fast).abs().max() / via_half.abs().max())
    return {"n": n, "grads_rows_timed": g_rows, "parameters": problem.params.size, "device": str(device),
            "threads": torch.get_num_threads(), "grads_s": round(t_grads, 2), "fit_s": round(t_fit, 2),
            "self_influence_s": round(t_si, 2), "ratio_self_influence_to_grads": round(t_si / t_grads, 3),
            "ratio_fit_plus_self_influence_to_grads": round((t_fit + t_si) / t_grads, 3),
            "half_ihvp_route_s_extrapolated": round(t_half / half_rows * n, 1),
            "fast_vs_half_ihvp_max_rel_diff": agree,
            "peak_mib_grads": round(m_grads), "peak_mib_fit": round(m_fit), "peak_mib_self_influence": round(m_si)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--half-rows", type=int, default=64, help="rows timed for the half_ihvp route")
    parser.add_argument("--grads-rows", type=int, default=None,
                        help="time per-example gradients on this many rows and scale to n (default: all rows)")
    parser.add_argument("--skip-small", action="store_true", help="do not repeat at n / 5 (memory check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [args.n] if args.skip_small else [max(args.n // 5, args.half_rows), args.n]
    for n in sizes:
        print(json.dumps(run(n, args.hidden, args.batch, device, args.half_rows, args.grads_rows)), flush=True)


if __name__ == "__main__":
    main()
