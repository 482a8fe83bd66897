"""report.html: self-contained (no script, no URL, every image a data: URI), escaped, and holding the CSVs' top rows."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from influence_cli import html_report
from influence_cli.errors import ConfigError

HOSTILE = "<b>x&y</b>.png"


class Page(HTMLParser):
    """Every tag, every <img> src, and the cell texts of each table's body rows, in order."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self._in_body = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[-1].append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def make_report(folder, n=60, suspicion=True, flagged_ids=None, seed=0):
    """A selfcheck report folder in SPEC's layout: selfcheck.csv, classes.csv, selfcheck_groups.csv, manifest."""
    rng = np.random.default_rng(seed)
    ids = [f"{i % 3}/r{i:03d}.png" for i in range(n)]
    ids[4] = HOSTILE
    si = np.sort(rng.lognormal(0, 2, n))[::-1]
    flagged_ids = set(ids[:8]) if flagged_ids is None else set(flagged_ids)
    flagged = np.array([i in flagged_ids for i in ids])
    table = pd.DataFrame({
        "rank": np.arange(1, n + 1), "id": ids, "label": [str(i % 3) for i in range(n)],
        "predicted": [str((i + 1) % 3) for i in range(n)], "prob_label": rng.uniform(0, 1, n),
        "loss": rng.uniform(0, 5, n), "self_influence": si, "suspicion": si / si.max(), "flagged": flagged,
        "suggested_label": [str((i + 1) % 3) if f else "" for i, f in enumerate(flagged)],
        "source": [f"annotator_{'ab'[i % 2]}" for i in range(n)]})
    if not suspicion:
        table = table.drop(columns="suspicion")
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "selfcheck.csv", index=False)
    pd.DataFrame({"label": ["0", "1", "2"], "rows": [20, 20, 20], "flagged": [3, 3, 2],
                  "estimated_error_rate": [0.15, 0.15, 0.1], "top_suggested_label": ["1", "2", "0"]}
                 ).to_csv(folder / "classes.csv", index=False)
    pd.DataFrame({"group": ["annotator_a", "annotator_b"], "rows": [30, 30], "flagged": [5, 3],
                  "estimated_error_rate": [0.17, 0.1], "mean_suspicion": [0.2, 0.1]}
                 ).to_csv(folder / "selfcheck_groups.csv", index=False)
    summary = {"n": n, "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
               "estimated_error_rate": 0.095, "estimated_error_rate_ci95": [0.07, 0.12], "train_accuracy": 0.9}
    (folder / "manifest.json").write_text(json.dumps({"command": "selfcheck", "summary": summary,
                                                      "warnings": ["gradient norm <high> at the checkpoint"]}))
    return table


def png(color=(200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_report_is_self_contained_and_escaped(tmp_path):
    table = make_report(tmp_path / "r")
    text = html_report.render_report(tmp_path / "r", {i: png() for i in table["id"][:10]})
    page = Page(text)
    low = text.lower()
    assert "http://" not in low and "https://" not in low and "<script" not in low and "@import" not in low
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert len(page.images) == 1 + 10  # the plot and the ten thumbnails
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.verify()
    assert HOSTILE not in text and "&lt;b&gt;x&amp;y&lt;/b&gt;.png" in text
    assert "<high>" not in text and "gradient norm &lt;high&gt;" in text  # manifest warnings, escaped


def test_tables_hold_the_csvs_top_rows_in_order(tmp_path):
    table = make_report(tmp_path / "r")
    page = Page(html_report.render_report(tmp_path / "r", top=25))
    classes, groups, suspects = page.tables
    assert [row[0] for row in classes] == ["0", "1", "2"]
    assert [row[0] for row in groups] == ["annotator_a", "annotator_b"]
    assert len(suspects) == 25
    assert [row[1] for row in suspects] == list(table["id"][:25])  # rank, id, ...
    assert [row[0] for row in suspects] == [str(r) for r in range(1, 26)]
    assert any("annotator_a" in row for row in suspects)  # carried text columns come along


def test_summary_shows_flagged_count_and_estimated_error_rate(tmp_path):
    make_report(tmp_path / "r")
    text = html_report.render_report(tmp_path / "r")
    assert "8 (13.3%)" in text  # 8 of 60 flagged, counted from selfcheck.csv
    assert "9.5%" in text and "7.0%–12.0%" in text
    assert "Flag threshold: suspicion &gt;= " in text


def test_older_reports_without_suspicion_fall_back_to_self_influence(tmp_path):
    table = make_report(tmp_path / "r", suspicion=False)
    text = html_report.render_report(tmp_path / "r")
    threshold = table.loc[table["flagged"], "self_influence"].min()
    assert "histogram of self_influence" in text and f"self_influence &gt;= {threshold:.4g}" in text


def test_history_lists_new_persistent_and_resolved_ids(tmp_path):
    table = make_report(tmp_path / "new")
    ids = list(table["id"])
    make_report(tmp_path / "old", flagged_ids=ids[5:8] + ids[20:22])  # new: 0-4, persistent: 5-7, resolved: 20-21
    page = Page(html_report.render_report(tmp_path / "new", history=tmp_path / "old"))
    changes = {row[0].split()[0]: row for row in page.tables[-1]}
    assert changes["new"][1] == "5" and changes["persistent"][1] == "3" and changes["resolved"][1] == "2"
    assert changes["new"][2] == ", ".join(ids[:5])  # most suspect first
    assert changes["resolved"][2] == ", ".join(ids[20:22])


def test_history_of_another_dataset_is_a_note_not_a_failure(tmp_path):
    make_report(tmp_path / "new")
    other = make_report(tmp_path / "old")
    other["id"] = [f"x{i}" for i in range(len(other))]
    other.to_csv(tmp_path / "old" / "selfcheck.csv", index=False)
    text = html_report.render_report(tmp_path / "new", history=tmp_path / "old")
    assert "shares no row ids" in text


def test_suspect_sheets_in_the_folder_are_embedded(tmp_path):
    make_report(tmp_path / "r")
    Image.new("RGB", (30, 20), (0, 90, 0)).save(tmp_path / "r" / "suspects.png")
    page = Page(html_report.render_report(tmp_path / "r"))
    assert len(page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in page.images)


def test_missing_matplotlib_is_a_config_error_with_the_extra(tmp_path, monkeypatch):
    make_report(tmp_path / "r")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError) as caught:
        html_report.render_report(tmp_path / "r")
    assert caught.value.hint == "pip install 'influence-cli[report]'"


def test_a_folder_without_selfcheck_csv_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="selfcheck.csv"):
        html_report.render_report(tmp_path)


def test_write_report_is_atomic(tmp_path):
    make_report(tmp_path / "r")
    text = html_report.render_report(tmp_path / "r")
    path = html_report.write_report(tmp_path / "r", text)
    assert path == tmp_path / "r" / "report.html" and path.read_text(encoding="utf-8") == text
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


def test_rank_group_effects_are_shown_with_their_method(tmp_path):
    make_report(tmp_path / "r")
    pd.DataFrame({"group": ["flips", "clean"], "size": [40, 200], "loss_change_if_removed": [-0.2, 0.05],
                  "method": ["retrained", "newton"], "loss_change_if_removed_newton": [-0.02, 0.05],
                  "loss_change_if_removed_1st": [-0.01, 0.04], "trusted": [True, True]}
                 ).to_csv(tmp_path / "r" / "groups.csv", index=False)
    text = html_report.render_report(tmp_path / "r")
    effects = Page(text).tables[-1]
    assert "Group effects on the test loss" in text
    assert [row[0] for row in effects] == ["flips", "clean"] and [row[3] for row in effects] == ["retrained", "newton"]
    assert len(effects[0]) == 6  # the first-order column stays in the CSV
