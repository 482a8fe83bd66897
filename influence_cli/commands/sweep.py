"""`--damping-sweep`: how much a ranking moves at 0.1x and 10x `solver.damping`.

The command's own scoring reruns on the loaded data and model with only the curvature refitted at
the new damping (direct's Cholesky factor is refactored from H without a pass over the data,
solvers/redamp.py), so every option of the command (--knn, --top, --group-by, --rank-by) holds
for the swept rankings too. Agreement: Spearman over all rows and over the reference's top 10%,
and the overlap of the two top 10%s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ..run import Run
from ..solvers.redamp import redamped
from ..stats import spearman

FACTORS = (0.1, 10.0)


def swept_damping(damping: float, factor: float) -> float:
    """factor x damping; 1e-4 and 1e-2 when the damping is 0."""
    return damping * factor if damping > 0 else (1e-4 if factor < 1 else 1e-2)


def damping_sweep(run: Run, base: dict[str, pd.DataFrame], rescore: Callable[[], dict[str, pd.DataFrame]],
                  table: str, column: str, *, descending: bool) -> dict[str, Any]:
    """Agreement of `rescore()`'s ranking at 0.1x and 10x damping with `base` (the run's own tables).
    `descending`: high values lead the ranking (selfcheck); else the most negative do (rank)."""
    damping, solver = run.damping, run.fitted()
    reference = base[table].set_index("id")[column]
    out: dict[str, Any] = {"damping": damping, "column": column}
    try:
        for factor in FACTORS:
            value = swept_damping(damping, factor)
            run.at_damping(value, redamped(solver, value, run.problem))
            with run.timer("damping_sweep"):
                values = rescore()[table].set_index("id")[column].loc[reference.index]
            figures = agreement(reference.to_numpy(dtype=float), values.to_numpy(dtype=float), descending)
            out[f"x{factor:g}"] = {"damping": value, **figures}
            if figures["spearman_top"] < 0.8:
                run.warnings.append(f"the top of the ranking depends on solver.damping: Spearman"
                                    f" {figures['spearman_top']:.2f} with the ranking at {factor:g}x damping;"
                                    " check `infl verify` before acting on it")
    finally:
        run.at_damping(damping, solver)
    return out


def agreement(ref: np.ndarray, alt: np.ndarray, descending: bool) -> dict[str, float]:
    key_ref, key_alt = (ref, alt) if descending else (-ref, -alt)
    k = max(1, int(np.ceil(0.1 * len(ref))))
    top_ref = np.argsort(-key_ref, kind="stable")[:k]
    top_alt = set(np.argsort(-key_alt, kind="stable")[:k].tolist())
    return {"spearman": spearman(ref, alt), "spearman_top": spearman(ref[top_ref], alt[top_ref]),
            "top10pct_overlap": len(top_alt & set(top_ref.tolist())) / k}
