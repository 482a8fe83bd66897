"""`infl explain TEST_ID`: one test row, its prediction and loss, and its most helpful and most
harmful training rows (rank's computation restricted to that row: one test-side solve, one
streamed pass over the training rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..run import Report, Run
from . import rank as rank_cmd
from .images import explain_strip

EXPLAIN_COLUMNS = ["test_id", "test_label", "predicted", "direction", "rank", "train_id", "train_label",
                   "loss_change_if_removed"]


@dataclass(frozen=True)
class ExplainOptions:
    test_id: str
    top: int = 10


def explain(run: Run, options: ExplainOptions) -> Report:
    """explain.csv: the test row's top helpful then top harmful training rows, with its prediction."""
    run.test_rows([options.test_id], option="TEST_ID")  # named as the user typed it
    tables, summary, _ = rank_cmd.score(run, rank_cmd.RankOptions(top=options.top, test_ids=[options.test_id]))
    row = run.test_rows([options.test_id])[0]
    predicted, prob, loss = _prediction(run, row)
    parts = []
    for name, direction in (("helpful.csv", "helpful"), ("harmful.csv", "harmful")):
        frame = tables[name].copy()
        frame.insert(2, "predicted", predicted)
        frame.insert(3, "direction", direction)
        parts.append(frame)
    table = pd.concat(parts, ignore_index=True)
    extra = [c for c in table.columns if c not in EXPLAIN_COLUMNS]
    table = table[EXPLAIN_COLUMNS + extra]
    test = run.test
    summary = {"command": "explain", "test_id": options.test_id, "test_label": table["test_label"].iloc[0],
               "predicted": predicted, "prob_label": prob, "loss": loss, "top": options.top,
               "n": summary["n"], "solver": summary["solver"],
               "grad_norm_at_checkpoint": summary["grad_norm_at_checkpoint"],
               "test_row": row, "test_n": test.n if test else 0}
    norms = tuple((c.mean, c.std) for c in (run.cfg.data.test or run.cfg.data.train, run.cfg.data.train))
    pictures = explain_strip(test, run.train, table, options.top, *norms)  # type: ignore[arg-type]
    return run.finish(summary, {"explain.csv": table, **pictures})


def _prediction(run: Run, row: int) -> tuple[Any, float | None, float]:
    """The model's prediction (as a report value), probability of the given label and loss on one test row."""
    test = run.test
    _, x, y = next(iter(run.stream(test, [row])))  # type: ignore[arg-type]
    problem = run.problem
    with torch.no_grad():
        out = problem.model(x.to(problem.device))
        loss = float(problem.objective.per_example_loss(out, y.to(problem.device))[0])
        p_hat, p_label = problem.objective.predict(out, y.to(problem.device))
    if run.cfg.task == "regression":
        return float(p_hat.reshape(-1)[0]), None, loss
    name = test.label_names(p_hat.detach().cpu().reshape(-1))[0]  # type: ignore[union-attr]
    return name, float(p_label[0]) if p_label is not None else None, loss
