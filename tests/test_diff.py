"""diff.py: unreadable, empty or unrelated selfcheck reports are data errors naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from influence_cli.diff import diff_reports
from influence_cli.errors import ConfigError, DataError

HEADER = "rank,id,label,predicted,prob_label,loss,self_influence,flagged,suggested_label\n"


def report(folder: Path, rows: list[tuple[str, bool]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{i + 1},{rid},0,0,0.5,0.1,{10 - i},{flag},1\n" for i, (rid, flag) in enumerate(rows)]
    (folder / "selfcheck.csv").write_text(HEADER + "".join(lines))
    return folder


def test_diff_counts(tmp_path: Path) -> None:
    old = report(tmp_path / "old", [("a", True), ("b", False), ("NA", True)])
    new = report(tmp_path / "new", [("a", True), ("b", True), ("NA", False)])
    frame, counts = diff_reports(old, new)
    assert dict(zip(frame["id"], frame["status"], strict=True)) == {"b": "new", "a": "persistent", "NA": "resolved"}
    assert counts["new"] == 1 and counts["resolved"] == 1


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02\xff\xfe garbage \x00", b"\n\n", b"a,b\n\"unclosed\n"])
def test_unreadable_report_is_data_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    new = report(tmp_path / "new", [("a", True)])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "selfcheck.csv").write_bytes(content)
    with pytest.raises(DataError, match=r"OLD_DIR: .*old/selfcheck\.csv"):
        diff_reports(tmp_path / "old", new)


def test_reports_with_no_ids_in_common_are_refused(tmp_path: Path) -> None:
    old = report(tmp_path / "old", [("a", True), ("b", False)])
    new = report(tmp_path / "new", [("x", True), ("y", False)])
    with pytest.raises(DataError, match=r"no ids in common"):
        diff_reports(old, new)


def test_missing_report_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no selfcheck.csv"):
        diff_reports(tmp_path / "nope", tmp_path / "nope2")


def test_header_only_or_non_numeric_report_is_data_error(tmp_path: Path) -> None:
    new = report(tmp_path / "new", [("a", True)])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "selfcheck.csv").write_text(HEADER)
    with pytest.raises(DataError, match=r"OLD_DIR: .*has no rows"):
        diff_reports(tmp_path / "old", new)
    (tmp_path / "old" / "selfcheck.csv").write_text(HEADER + "1,a,0,0,0.5,0.1,lots,True,1\n")
    with pytest.raises(DataError, match=r"column 'self_influence' is not a number at id 'a'"):
        diff_reports(tmp_path / "old", new)
