"""Kronfluence-style invariance: how the work is cut (cache.shard_rows, batch_size) and the order of the
training rows do not change any score; --test-ids gives a slice of the full run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from influence_cli import api
from influence_cli.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inv")
    shutil.copytree(ROOT / "sample_data" / "digits", root / "data")
    train = pd.read_csv(root / "data" / "train.csv", dtype={"id": str})
    train.iloc[np.random.default_rng(0).permutation(len(train))].to_csv(root / "data" / "permuted.csv", index=False)
    (root / "c.yaml").write_text(
        "model: {arch: logreg, kwargs: {in_features: 64, num_classes: 10}, checkpoint: data/logreg.pt}\n"
        "data:\n  train: {format: csv, path: data/train.csv, label: label, id: id, carry: [source]}\n"
        "  test: {format: csv, path: data/test.csv, label: label, id: id}\n"
        "weight_decay: 0.001\ncache: {enabled: false}\n")
    return root


def _scores(root: Path, *overrides: str) -> tuple[pd.Series, pd.Series]:
    cfg = load_config(root / "c.yaml", list(overrides))
    si = api.selfcheck(cfg).tables["selfcheck.csv"].set_index("id")["self_influence"]
    overall = api.rank(cfg, test_ids=["d0022", "d1705"]).tables["overall.csv"].set_index("id")["loss_change_if_removed"]
    return si.sort_index(), overall.sort_index()


@pytest.fixture(scope="module")
def reference(digits):
    return _scores(digits)


@pytest.mark.parametrize("overrides", [
    ("cache.enabled=true", f"cache.dir={Path('/tmp') / 'infl-invariance-cache'}", "cache.shard_rows=300"),
    ("batch_size=37",),
    ("data.train.path=data/permuted.csv",),
], ids=["shard_rows", "batch_size", "permuted_rows"])
def test_scores_do_not_depend_on_how_the_work_is_cut(digits, reference, overrides):
    shutil.rmtree(Path("/tmp") / "infl-invariance-cache", ignore_errors=True)
    si, overall = _scores(digits, *overrides)
    pd.testing.assert_series_equal(si, reference[0], rtol=1e-7, atol=0)
    pd.testing.assert_series_equal(overall, reference[1], rtol=1e-7, atol=1e-12)


def test_test_ids_subset_is_a_slice_of_the_full_run(digits):
    cfg = load_config(digits / "c.yaml")
    full = api.rank(cfg, top=5).tables
    part = api.rank(cfg, top=5, test_ids=["d1705"]).tables
    for name in ("helpful.csv", "harmful.csv"):
        expected = full[name][full[name].test_id == "d1705"].reset_index(drop=True)
        pd.testing.assert_frame_equal(part[name], expected)
