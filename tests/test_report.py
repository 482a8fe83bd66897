"""Atomic report writing: all or nothing, previous report intact, no temp files left."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from influence_cli import report
from influence_cli.errors import ConfigError


def test_writes_all_files(tmp_path):
    files = report.write_atomic(tmp_path / "out", {"a.csv": pd.DataFrame({"x": [1.5, 2.0]})}, {"k": 1})
    assert [f.name for f in files] == ["a.csv", "manifest.json"]
    assert (tmp_path / "out" / "a.csv").read_text() == "x\n1.5\n2\n"


def test_failure_mid_write_leaves_previous_report(tmp_path, monkeypatch):
    report.write_atomic(tmp_path, {"a.csv": pd.DataFrame({"x": [1]}), "b.csv": pd.DataFrame({"y": [2]})}, {"v": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ConfigError, match="cannot write"):
        report.write_atomic(tmp_path, {"a.csv": pd.DataFrame({"x": [9]}), "b.csv": pd.DataFrame({"y": [9]})}, {"v": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing new, no temp files


def test_failure_while_staging_removes_temps(tmp_path, monkeypatch):
    report.write_atomic(tmp_path, {"a.csv": pd.DataFrame({"x": [1]})}, {})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fsync = os.fsync
    count = [0]

    def flaky_fsync(fd):
        count[0] += 1
        if count[0] == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    with pytest.raises(ConfigError):
        report.write_atomic(tmp_path, {"a.csv": pd.DataFrame({"x": [2]})}, {"new": True})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_unwritable_folder_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create"):
        report.write_atomic(blocker / "sub", {}, {})


def test_sort_orders_break_ties_by_row():
    import numpy as np

    values = np.array([1.0, 3.0, 1.0, 3.0])
    assert list(report.order_desc(values)) == [1, 3, 0, 2]
    assert list(report.order_asc(values)) == [0, 2, 1, 3]



def test_report_files_get_the_usual_permissions(tmp_path) -> None:
    """Not mkstemp's 0600: teammates and other pipeline users must be able to read the report."""
    mask = os.umask(0)
    os.umask(mask)
    files = report.write_atomic(tmp_path, {"a.csv": pd.DataFrame({"x": [1]})}, {"m": 1})
    assert all((f.stat().st_mode & 0o777) == (0o666 & ~mask) for f in files)
    assert 0o666 & ~mask != 0o600
