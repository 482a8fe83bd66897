"""Peak memory of arnoldi's Krylov iteration (`block_krylov`) against the size of its basis.

Runs the iteration on a diagonal operator of size p (no model, no data: only the basis and the working
blocks of each pass), b = 70 vectors per block (rank 50 + oversample 20), 10 passes, and prints the basis
size and the process's peak RSS. Before the basis grew in place, p = 300k peaked at 4.6 GB for a 1.6 GB
basis; in place, 3.4 GB (the ~9b working rows the solver's memory check now counts).
Run: .venv/bin/python benchmarks/arnoldi_memory.py [p]
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from influence_cli.solvers.arnoldi import block_krylov  # noqa: E402


def main() -> None:
    p, b = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000, 70
    torch.manual_seed(0)
    diag = torch.rand(p, dtype=torch.float64) ** 4
    start = torch.randn(b, p, dtype=torch.float64)
    t = time.perf_counter()
    k = block_krylov(lambda v: v * diag, start, 50, 10, 1e-12)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"p={p} passes={k.passes} basis rows={k.dim} ({k.dim * p * 8 / 2**30:.2f} GB) {time.perf_counter() - t:.1f}s"
          f" peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
