"""Property-based: whatever a pipeline writes into the training CSV, `infl selfcheck` ends with exit 0
(clean data) or 3 (unusable data), one `error:` line naming the problem, no traceback, and the
previous report untouched; clean data always gives a full, sorted report."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from influence_cli import cli
from influence_cli.config import ModelConfig
from influence_cli.models import build_model, save_checkpoint

CLASSES, FEATURES = 3, 2

number = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
cell = st.one_of(
    number.map(repr),
    st.integers(-5, 5).map(str),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "", "abc", "1,5", "1e400", " ", "None", "--", "0x1F", "é"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"), max_size=4),
)
label = st.one_of(st.integers(-2, CLASSES + 1).map(str), st.sampled_from(["", "nan", "cat", "1.0", "1.5"]))
rows = st.lists(st.tuples(label, cell, cell), min_size=0, max_size=12)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    model = ModelConfig(arch="logreg", kwargs={"in_features": FEATURES, "num_classes": CLASSES})
    torch.manual_seed(0)
    save_checkpoint(build_model(model), root / "model.pt")
    (root / "config.yaml").write_text(
        f"model: {{arch: logreg, kwargs: {{in_features: {FEATURES}, num_classes: {CLASSES}}}, checkpoint: model.pt}}\n"
        "data: {train: {format: csv, path: train.csv, label: label, id: id}}\n"
        "device: cpu\ncache: {enabled: false}\n")
    return root


def _clean(table: list[tuple[str, str, str]]) -> bool:
    """Rows a careful user would call usable: integer labels in range, finite numeric features."""
    if not table:
        return False
    for lab, *feats in table:
        if lab not in {str(c) for c in range(CLASSES)}:
            return False
        for f in feats:
            try:
                if not math.isfinite(float(f)) or not f.strip() or f.strip().lower() in ("nan", "inf", "-inf"):
                    return False
            except ValueError:
                return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=rows)
def test_any_csv_ends_in_a_clean_exit(workspace: Path, table: list[tuple[str, str, str]], capsys) -> None:
    out = workspace / "out"
    out.mkdir(exist_ok=True)
    (out / "selfcheck.csv").write_text("previous\n")
    with open(workspace / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "f0", "f1"])
        writer.writerows([(f"r{i}", *row) for i, row in enumerate(table)])
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", str(workspace / "config.yaml"), "-o", str(out), "--quiet"])
    code, err = exc.value.code, capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 3), err  # never 4 (a bug) on data a pipeline can produce
    assert code == 0 or not _clean(table), err
    if code == 3:
        lines = err.strip().splitlines()
        assert lines[0].startswith("error: ") and len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("  hint:"))
        assert (out / "selfcheck.csv").read_text() == "previous\n"
        return
    report = pd.read_csv(out / "selfcheck.csv", keep_default_na=False)
    assert len(report) == len(table) and sorted(report["id"]) == sorted(f"r{i}" for i in range(len(table)))
    assert report["self_influence"].is_monotonic_decreasing
    if _clean(table):
        return
    # accepted though not "clean" by our rule: only ways of writing numbers pandas reads as finite
    frame = pd.read_csv(workspace / "train.csv")
    assert frame[["f0", "f1"]].apply(pd.to_numeric, errors="coerce").notna().all().all()
    assert torch.isfinite(torch.tensor(frame[["f0", "f1"]].astype(float).to_numpy())).all()


@pytest.mark.parametrize("table", [[("0", "1.0", "2.0"), ("2", "-3", "0.5")]])
def test_clean_table_is_accepted(workspace: Path, table: list[tuple[str, str, str]], capsys) -> None:
    assert _clean(table)
    with open(workspace / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("id", "label", "f0", "f1"), *[(f"r{i}", *r) for i, r in enumerate(table)]])
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", str(workspace / "config.yaml"), "-o", str(workspace / "ok"), "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
