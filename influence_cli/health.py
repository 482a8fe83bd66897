"""Class and group health of a selfcheck: per given label (classes.csv) and per group
(selfcheck_groups.csv), how many rows, how many flagged, and the estimated error rate.

The estimated error rate of a class or group is the mean of the rows' estimated probabilities that
their label is wrong when the suspicion method gives them (signals.py), else its flagged fraction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

CLASS_COLUMNS = ["label", "rows", "flagged", "estimated_error_rate", "top_suggested_label"]
GROUP_COLUMNS = ["group", "rows", "flagged", "estimated_error_rate", "mean_suspicion"]


def class_table(labels: Sequence, flagged: np.ndarray, suggested: Sequence | None,
                error_probability: np.ndarray | None) -> pd.DataFrame:
    """One row per given label (in order of first appearance sorted by label), SPEC's classes.csv."""
    frame = pd.DataFrame({"label": np.asarray(labels, dtype=object), "flagged": np.asarray(flagged, dtype=bool),
                          "error": _error(flagged, error_probability),
                          "suggested": np.asarray(suggested if suggested is not None else [""] * len(flagged),
                                                  dtype=object)})
    rows = []
    for label, part in frame.groupby("label", sort=True):
        hits = part.suggested[part.flagged & (part.suggested.astype(str) != "")]
        top = str(hits.value_counts().sort_index(kind="stable").sort_values(ascending=False, kind="stable").index[0]
                  ) if len(hits) else ""
        rows.append((label, len(part), int(part.flagged.sum()), float(part.error.mean()), top))
    return pd.DataFrame.from_records(rows, columns=CLASS_COLUMNS)


def group_table(groups: Sequence, flagged: np.ndarray, suspicion: np.ndarray,
                error_probability: np.ndarray | None) -> pd.DataFrame:
    """One row per group, SPEC's selfcheck_groups.csv, sorted by estimated error rate descending."""
    frame = pd.DataFrame({"group": np.asarray(groups).astype(str), "flagged": np.asarray(flagged, dtype=bool),
                          "error": _error(flagged, error_probability), "suspicion": np.asarray(suspicion, float)})
    table = frame.groupby("group", sort=True).agg(rows=("flagged", "size"), flagged=("flagged", "sum"),
                                                  estimated_error_rate=("error", "mean"),
                                                  mean_suspicion=("suspicion", "mean")).reset_index()
    table["flagged"] = table["flagged"].astype(int)
    return table.sort_values(["estimated_error_rate", "group"], ascending=[False, True],
                             kind="stable").reset_index(drop=True)[GROUP_COLUMNS]


def _error(flagged: np.ndarray, error_probability: np.ndarray | None) -> np.ndarray:
    if error_probability is None:
        return np.asarray(flagged, dtype=float)
    return np.asarray(error_probability, dtype=float)


LOW_ACCURACY = 0.5  # a classifier predicting fewer of its own training labels than this fits nothing


def accuracy_warnings(accuracy: float | None, advice: str = "check the data and labels, and train.lr/train.epochs"
                      ) -> list[str]:
    """The warning for a training accuracy under LOW_ACCURACY (none for regression: accuracy None): what
    train, selfcheck and rank print in the terminal and keep in the manifest."""
    if accuracy is None or accuracy != accuracy or accuracy >= LOW_ACCURACY:
        return []
    return [f"training accuracy {accuracy:.1%} is under {LOW_ACCURACY:.0%}: the model fits almost nothing of its"
            f" training labels, so influence scores and suspects mean little; {advice}"]
