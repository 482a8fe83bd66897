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


# ---- issue 14.3: one run's complete set per command, swapped in whole


def files_in(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def selfcheck_run(folder, value, groups=True):
    tables = {"selfcheck.csv": pd.DataFrame({"id": ["a"], "v": [value]})}
    if groups:
        tables["selfcheck_groups.csv"] = pd.DataFrame({"group": ["g"], "v": [value]})
    return report.write_atomic(folder, tables, {"command": "selfcheck", "v": value})


def test_manifest_that_is_a_directory_leaves_the_old_set(tmp_path):
    selfcheck_run(tmp_path, 1)
    before = files_in(tmp_path)
    (tmp_path / "selfcheck.manifest.json").unlink()
    (tmp_path / "selfcheck.manifest.json").mkdir()  # the last file of the swap cannot be replaced
    before.pop("selfcheck.manifest.json")
    with pytest.raises(ConfigError, match="cannot write the report.*previous report is unchanged"):
        selfcheck_run(tmp_path, 2)
    assert files_in(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "selfcheck.manifest.json"])


def test_rerun_removes_the_files_its_previous_run_wrote(tmp_path):
    selfcheck_run(tmp_path, 1, groups=True)
    rank = {"overall.csv": pd.DataFrame({"r": [1]}), "groups.csv": pd.DataFrame({"g": [1]})}
    report.write_atomic(tmp_path, rank, {"command": "rank", "v": 1})
    report.write_atomic(tmp_path, {"overall.csv": pd.DataFrame({"r": [2]})}, {"command": "rank", "v": 2})
    names = {p.name for p in tmp_path.iterdir()}
    assert "groups.csv" not in names  # rank's stale file
    assert {"selfcheck.csv", "selfcheck_groups.csv", "overall.csv"} <= names  # selfcheck's set stays
    selfcheck_run(tmp_path, 3, groups=False)
    assert "selfcheck_groups.csv" not in {p.name for p in tmp_path.iterdir()}
    assert "overall.csv" in {p.name for p in tmp_path.iterdir()}


def test_every_command_manifest_stays_readable(tmp_path):
    selfcheck_run(tmp_path, 1)
    report.write_atomic(tmp_path, {"overall.csv": pd.DataFrame({"r": [1]})}, {"command": "rank", "v": 7})
    import json

    assert json.loads((tmp_path / "manifest.json").read_text())["command"] == "rank"  # the latest run
    assert json.loads((tmp_path / "rank.manifest.json").read_text())["v"] == 7
    assert json.loads((tmp_path / "selfcheck.manifest.json").read_text()) == {"command": "selfcheck", "v": 1}


def test_diff_beside_a_selfcheck_and_retired_by_its_rerun(tmp_path):
    selfcheck_run(tmp_path, 1)
    manifest = (tmp_path / "manifest.json").read_bytes()
    files = report.write_atomic(tmp_path, {"diff.csv": pd.DataFrame({"id": ["a"]})}, None, command="diff")
    assert [f.name for f in files] == ["diff.csv"] and (tmp_path / "manifest.json").read_bytes() == manifest
    selfcheck_run(tmp_path, 2)
    assert not (tmp_path / "diff.csv").exists()  # it compared against the selfcheck that was replaced


def test_text_and_bytes_payloads(tmp_path):
    report.write_atomic(tmp_path, {"report.html": "<p>é</p>", "a.png": b"\x89PNG"}, None, command="report")
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == "<p>é</p>"
    assert (tmp_path / "a.png").read_bytes() == b"\x89PNG"


def test_a_swap_killed_midway_is_undone_by_the_next_write(tmp_path, monkeypatch):
    """SIGKILL cannot be caught: simulate it by stopping the swap without its rollback."""
    selfcheck_run(tmp_path, 1, groups=False)
    before = files_in(tmp_path)
    calls = [0]
    real = report._swap_one

    def killed(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise SystemExit("killed")
        return real(*args)

    monkeypatch.setattr(report, "_swap_one", killed)
    monkeypatch.setattr(report, "_roll_back", lambda *a: None)
    monkeypatch.setattr(report.shutil, "rmtree", lambda *a, **k: None)  # the stage stays, as after a kill
    with pytest.raises(SystemExit):
        selfcheck_run(tmp_path, 2, groups=True)
    assert files_in(tmp_path) != before  # half swapped
    monkeypatch.undo()
    report._recover(tmp_path, next(tmp_path.glob(".infl-stage-*")))
    assert files_in(tmp_path) == before and not list(tmp_path.glob(".infl-stage-*"))
