"""Every shipped example config runs `selfcheck` end to end on its sample data (real files, real CLI)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from influence_cli import cli

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = ["digits", "digits_mlp", "breast_cancer", "wine_parquet", "digits_tensors", "digits_python",
            "digits_images"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_example_config_selfcheck(name, tmp_path, capsys):
    config = ROOT / "configs" / f"{name}.yaml"
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", str(config), "-o", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    table = pd.read_csv(tmp_path / "selfcheck.csv")
    assert table["id"].is_unique and (table["self_influence"] >= 0).all()
    assert table["suspicion"].is_monotonic_decreasing  # the default sort (SPEC)


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine_parquet", "digits_tensors"])
def test_logistic_regressions_find_80_percent_of_flips_in_top_10_percent(name, tmp_path, capsys):
    config = ROOT / "configs" / f"{name}.yaml"
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", str(config), "-o", str(tmp_path), "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    folder = {"digits": "digits", "breast_cancer": "breast_cancer", "wine_parquet": "wine",
              "digits_tensors": "digits_tensors"}[name]
    key = pd.read_csv(ROOT / "sample_data" / folder / "answer_key.csv")
    table = pd.read_csv(tmp_path / "selfcheck.csv")
    top = table.head(round(0.1 * len(table))).merge(key, on="id")
    recall = top["flipped"].sum() / key["flipped"].sum()
    assert recall >= 0.8, recall
