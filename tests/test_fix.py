"""`infl fix` and `infl verify --fix` end to end on a copy of the digits sample (10% flipped labels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli as run

from influence_cli import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fix")
    shutil.copytree(ROOT / "sample_data" / "digits", root / "data")
    (root / "c.yaml").write_text(
        "model: {arch: logreg, kwargs: {in_features: 64, num_classes: 10}, checkpoint: data/logreg.pt}\n"
        "data:\n  train: {format: csv, path: data/train.csv, label: label, id: id, carry: [source]}\n"
        "  test: {format: csv, path: data/test.csv, label: label, id: id}\n"
        "weight_decay: 0.001\ntrain: {epochs: 300}\noutput: {dir: reports}\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", str(root / "c.yaml"), "--quiet"])
    assert exc.value.code == 0
    return root


def test_fix_top_writes_a_corrected_copy_and_never_touches_the_original(capsys, digits):
    original = (digits / "data" / "train.csv").read_bytes()
    code, out, err = run(capsys, "fix", "-c", str(digits / "c.yaml"), "--top", "100", "--json")
    assert code == 0, err
    assert (digits / "data" / "train.csv").read_bytes() == original
    fixes = pd.read_csv(digits / "reports" / "fixes.csv", dtype=str)
    assert list(fixes.columns) == ["id", "label", "new_label", "suspicion"]
    assert 0 < len(fixes) <= 100 and (fixes.label != fixes.new_label).all()
    before = pd.read_csv(digits / "data" / "train.csv", dtype=str)
    after = pd.read_csv(digits / "reports" / "train.fixed.csv", dtype=str)
    assert list(after.columns) == list(before.columns) and len(after) == len(before)
    changed = after.label != before.label
    assert set(after.id[changed]) == set(fixes.id)
    assert after.drop(columns="label").equals(before.drop(columns="label"))  # every other cell as read
    new = dict(zip(fixes.id, fixes.new_label, strict=True))
    assert all(after.label[i] == new[after.id[i]] for i in after.index[changed])
    key = pd.read_csv(digits / "data" / "answer_key.csv", dtype=str)
    truth = dict(zip(key.id, key.true_label, strict=True)) if "true_label" in key.columns else None
    if truth is not None:  # most fixes restore the true label on the digits demo
        assert sum(new[i] == truth[i] for i in new) >= 0.7 * len(new)
    assert json.loads(out)["fixed"] == len(fixes)


def test_fix_needs_exactly_one_choice_and_a_report(capsys, digits, tmp_path):
    code, _, err = run(capsys, "fix", "-c", str(digits / "c.yaml"))
    assert code == 2 and "--top" in err
    code, _, err = run(capsys, "fix", "-c", str(digits / "c.yaml"), "-o", str(tmp_path), "--flagged")
    assert code == 2 and "infl selfcheck" in err


def test_fix_accept_takes_the_edited_rows(capsys, digits, tmp_path):
    table = pd.read_csv(digits / "reports" / "selfcheck.csv", dtype=str, keep_default_na=False)
    table["accept"] = ""
    table.loc[[0, 2], "accept"] = "yes"
    table.loc[2, "new_label"] = "0" if table.loc[2, "label"] != "0" else "1"
    edited = tmp_path / "edited.csv"
    table.to_csv(edited, index=False)
    code, _, err = run(capsys, "fix", "-c", str(digits / "c.yaml"), "--accept", str(edited), "--quiet")
    assert code == 0, err
    fixes = pd.read_csv(digits / "reports" / "fixes.csv", dtype=str)
    assert fixes.id.tolist() == [table.id[0], table.id[2]][: len(fixes)] and fixes.new_label.iloc[-1] == table.loc[2, "new_label"]


def test_verify_fix_reports_accuracy_before_and_after(capsys, digits):
    assert run(capsys, "fix", "-c", str(digits / "c.yaml"), "--flagged", "--quiet")[0] == 0
    fixes = str(digits / "reports" / "fixes.csv")
    code, out, err = run(capsys, "verify", "-c", str(digits / "c.yaml"), "--fix", fixes, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["fixes"] > 0 and doc["accuracy_gain"] == pytest.approx(doc["accuracy_after"] - doc["accuracy_before"])
    lo, hi = doc["accuracy_gain_ci95"]
    assert lo <= doc["accuracy_gain"] <= hi
    assert doc["test_loss_after"] < doc["test_loss_before"]  # fixing flipped labels helps on the demo
    table = pd.read_csv(digits / "reports" / "fix_verify.csv")
    assert table.correct_after.mean() == pytest.approx(doc["accuracy_after"])
    code, _, err = run(capsys, "verify", "-c", str(digits / "c.yaml"), "--fix", fixes, "--min-gain", "0.5", "--quiet")
    assert code == 1 and "--min-gain" in err
