"""Fault injection over the report writer (issue 14): every write, fsync, link, mkdir and rename
of a report swap fails in turn (once, and from then on, as a full disk does) and the folder must
hold the previous set or the new set, whole, with no temp file or stage folder left."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from influence_cli import report
from influence_cli.errors import ConfigError

OPS = ("replace", "fsync", "write", "link", "mkdir")


def old_state(folder: Path) -> None:
    """A folder holding a selfcheck (with groups), a rank and a diff beside them."""
    folder.mkdir()
    report.write_atomic(folder, {"selfcheck.csv": pd.DataFrame({"id": ["a", "b"], "v": [1.0, 2.0]}),
                                 "selfcheck_groups.csv": pd.DataFrame({"g": ["x"]})},
                        {"command": "selfcheck", "run": 1})
    report.write_atomic(folder, {"overall.csv": pd.DataFrame({"r": [1]})}, {"command": "rank", "run": 1})
    report.write_atomic(folder, {"diff.csv": pd.DataFrame({"id": ["a"]})}, None, command="diff")


def new_run(folder: Path) -> None:
    """A selfcheck rerun without groups: replaces 3 files, removes selfcheck_groups.csv and diff.csv."""
    report.write_atomic(folder, {"selfcheck.csv": pd.DataFrame({"id": ["b", "a"], "v": [9.0, 8.0]})},
                        {"command": "selfcheck", "run": 2})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def inject(monkeypatch: pytest.MonkeyPatch, op: str, fail: Callable[[], bool]) -> list[int]:
    """Patch one operation so that it raises ENOSPC whenever fail() says so; returns a call counter."""
    calls = [0]

    def should_fail() -> bool:
        calls[0] += 1
        return fail()

    def error() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device")

    if op == "write":
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            real_write = f.write

            def write(data):
                if should_fail():
                    raise error()
                return real_write(data)

            f.write = write
            return f

        monkeypatch.setattr(os, "fdopen", fdopen)
        return calls
    real = getattr(os, op)

    def patched(*args, **kwargs):
        if should_fail():
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(os, op, patched)
    return calls


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("ref") / "out"
    old_state(folder)
    before = snapshot(folder)
    new_run(folder)
    after = snapshot(folder)
    assert "selfcheck_groups.csv" not in after and "diff.csv" not in after and "overall.csv" in after
    return before, after


def count_calls(tmp_path: Path, op: str) -> int:
    folder = tmp_path / f"count-{op}"
    old_state(folder)
    with pytest.MonkeyPatch.context() as mp:
        calls = inject(mp, op, lambda: False)
        new_run(folder)
    return calls[0]


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "from-then-on"])
@pytest.mark.parametrize("op", OPS)
def test_every_fault_leaves_the_old_set_or_the_new_set(tmp_path: Path, expected, op: str, persistent: bool) -> None:
    before, after = expected
    total = count_calls(tmp_path, op)
    assert total >= 1, f"{op} is never called: the test would prove nothing"
    outcomes = set()
    for k in range(1, total + 1):
        folder = tmp_path / f"{op}-{k}"
        old_state(folder)
        with pytest.MonkeyPatch.context() as mp:
            calls = inject(mp, op, lambda k=k: calls[0] >= k if persistent else calls[0] == k)  # noqa: B023
            try:
                new_run(folder)
                outcome = "new"
            except ConfigError as e:
                assert "previous report is unchanged" in str(e) or "cannot write" in str(e)
                outcome = "old"
        state = snapshot(folder)
        leftovers = [n for n in state if n.endswith(".tmp") or n.startswith(".infl-stage-")]
        assert not leftovers, (op, k, leftovers)
        if persistent and op == "replace":
            # rename itself broken for good: the rollback cannot run either; the folder must still
            # be one whole set or the old one with, at worst, nothing half-written in place
            assert all(state.get(n) in (before.get(n), after.get(n)) for n in state), (op, k)
            continue
        assert state == (after if outcome == "new" else before), (op, k, outcome, sorted(state))
        outcomes.add(outcome)
    # a failed hard link falls back to a copy of the previous file and a failed fsync of the folder
    # after the swap is best effort, so those runs succeed; every other fault keeps the old set
    assert outcomes == {"new"} if op == "link" else "old" in outcomes or persistent and op == "replace", outcomes


def test_full_disk_during_staging_is_a_config_error_naming_the_folder(tmp_path: Path, expected) -> None:
    before, _ = expected
    folder = tmp_path / "out"
    old_state(folder)
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, "write", lambda: True)
        with pytest.raises(ConfigError, match=r"output folder .*out: cannot write the report \(No space left"):
            new_run(folder)
    assert snapshot(folder) == before


def test_interrupt_during_the_swap_finishes_it(tmp_path: Path, expected, monkeypatch) -> None:
    """Ctrl-C arriving mid-swap is held until the swap is done: the new set, whole, then the interrupt."""
    import signal

    _, after = expected
    folder = tmp_path / "out"
    old_state(folder)
    real = report._swap_one
    sent = [False]

    def swap_one(*args):
        if not sent[0]:
            sent[0] = True
            signal.raise_signal(signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(report, "_swap_one", swap_one)
    with pytest.raises(KeyboardInterrupt):
        new_run(folder)
    assert snapshot(folder) == after


def test_no_stage_left_when_staging_is_interrupted(tmp_path: Path, expected, monkeypatch) -> None:
    before, _ = expected
    folder = tmp_path / "out"
    old_state(folder)
    monkeypatch.setattr(report, "_encode", lambda v: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        new_run(folder)
    assert snapshot(folder) == before
