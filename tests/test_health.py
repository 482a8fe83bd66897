"""classes.csv and selfcheck_groups.csv: counts, error rates and the most common suggestion, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from influence_cli.health import CLASS_COLUMNS, GROUP_COLUMNS, class_table, group_table


def test_class_table_counts_by_hand():
    labels = ["a", "a", "a", "b", "b", "c"]
    flagged = np.array([True, True, False, True, False, False])
    suggested = ["b", "c", "", "a", "", ""]
    t = class_table(labels, flagged, suggested, None)
    assert list(t.columns) == CLASS_COLUMNS and t.label.tolist() == ["a", "b", "c"]
    assert t.rows.tolist() == [3, 2, 1] and t.flagged.tolist() == [2, 1, 0]
    assert t.estimated_error_rate.tolist() == pytest.approx([2 / 3, 0.5, 0.0])
    assert t.top_suggested_label.tolist() == ["b", "a", ""]  # a tie (b, c) goes to the first in label order
    probs = np.array([0.9, 0.5, 0.1, 0.8, 0.2, 0.0])
    assert class_table(labels, flagged, suggested, probs).estimated_error_rate.tolist() == pytest.approx([0.5, 0.5, 0])


def test_group_table_sorted_by_error_rate():
    t = group_table(["x", "y", "x", "y", "z"], np.array([False, True, False, True, True]),
                    np.array([1.0, 3.0, 2.0, 5.0, 0.5]), None)
    assert list(t.columns) == GROUP_COLUMNS
    assert t.group.tolist() == ["y", "z", "x"] and t.rows.tolist() == [2, 1, 2]
    assert t.mean_suspicion.tolist() == pytest.approx([4.0, 0.5, 1.5])
