"""selfcheck --cross-fit K: folds, out-of-fold outputs that never saw their row, and what it buys on a
model that memorizes its labels."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

from influence_cli.config import load_config
from influence_cli.crossfit import out_of_fold_outputs, stratified_folds
from influence_cli.data import load_split
from influence_cli.errors import ConfigError
from influence_cli.objective import Objective


def write_case(root, n=150, d=4, classes=3, flips=0, seed=0, hidden=None, wd=1e-3, epochs=300):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int) if classes == 3 else (x[:, 0] > 0).astype(int)
    flipped = np.zeros(n, bool)
    if flips:
        rows = rng.choice(n, flips, replace=False)
        y[rows] = (y[rows] + rng.integers(1, classes, flips)) % classes
        flipped[rows] = True
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(d)])
    frame.insert(0, "id", [f"r{i}" for i in range(n)])
    frame["label"] = y
    frame.to_csv(root / "train.csv", index=False)
    arch = f"mlp, kwargs: {{in_features: {d}, hidden: [{hidden}], num_classes: {classes}, activation: tanh}}" \
        if hidden else f"logreg, kwargs: {{in_features: {d}, num_classes: {classes}}}"
    (root / "config.yaml").write_text(
        f"model: {{arch: {arch}, checkpoint: {root / 'm.pt'}}}\n"
        f"data:\n  train: {{format: csv, path: {root / 'train.csv'}, label: label, id: id}}\n"
        f"weight_decay: {wd}\ntrain: {{epochs: {epochs}, tol: 1.0e-9}}\n"
        f"output: {{dir: {root / 'reports'}}}\ncache: {{dir: {root / 'cache'}}}\n")
    return root / "config.yaml", flipped


def test_folds_are_stratified_seeded_and_cover_every_row():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=4)
    assert folds.shape == (20,) and set(folds) == {0, 1, 2}
    for c in (0, 1, 2):
        counts = np.bincount(folds[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(folds, stratified_folds(labels, 3, seed=4))
    assert not np.array_equal(folds, stratified_folds(labels, 3, seed=5))
    for bad in (1, 21):
        with pytest.raises(ConfigError, match="--cross-fit"):
            stratified_folds(labels, bad, seed=0)


def test_a_row_out_of_fold_output_does_not_depend_on_its_own_label(tmp_path):
    """The fold model that predicts row r never trained on r: changing r's label leaves r's out-of-fold
    output as it was (to L-BFGS precision), while it moves other folds' outputs (labels do matter)."""
    path, _ = write_case(tmp_path)
    cfg = load_config(path)
    split = load_split(cfg.data.train, "train", cfg.task)
    objective = Objective(cfg.task, cfg.weight_decay)
    folds = stratified_folds(split.labels.numpy(), 3, cfg.seed)
    base = out_of_fold_outputs(cfg, split, objective, torch.device("cpu"), torch.float64, 3)
    np.testing.assert_array_equal(base, out_of_fold_outputs(cfg, split, objective, torch.device("cpu"), torch.float64,
                                                            3, assignment=folds))  # the default folds
    r = 7
    split.labels[r] = (int(split.labels[r]) + 1) % 3
    moved = out_of_fold_outputs(cfg, split, objective, torch.device("cpu"), torch.float64, 3, assignment=folds)
    assert base.shape == (150, 3)
    np.testing.assert_allclose(moved[r], base[r], atol=1e-6)
    same_fold = folds == folds[r]
    assert np.abs(moved[same_fold] - base[same_fold]).max() < 1e-6  # that fold's model is the same model
    assert np.abs(moved[~same_fold] - base[~same_fold]).max() > 1e-4


def test_cross_fit_finds_the_flips_a_memorizing_model_hides(capsys, tmp_path):
    """An MLP with little weight decay fits its 20 flipped labels: in-sample signals barely see them;
    the out-of-fold suspicion ranks more of them on top, flags them, and the manifest says how."""
    path, flipped = write_case(tmp_path, n=200, flips=20, hidden=32, wd=1e-6, epochs=1500)
    code, _, err = run_cli(capsys, "train", "-c", str(path), "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "plain"), "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "cf"), "--cross-fit", "4",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["loo_loss_method"] == "cross_fit(4)"
    assert doc["suspicion_method"] == "rank_mean(loss,oof_loss,oof_margin)"
    assert doc["flag_method"] == "confident_learning(temperature_scaled_oof_probs)"
    assert doc["oof_temperature"] > 1.0  # a memorizing model's out-of-fold outputs are overconfident

    def found(folder):
        table = pd.read_csv(tmp_path / folder / "selfcheck.csv")
        ids = set(table["id"].head(20))
        truth = {f"r{i}" for i in np.flatnonzero(flipped)}
        return len(ids & truth), table

    truth = {f"r{i}" for i in np.flatnonzero(flipped)}
    plain, plain_table = found("plain")
    crossed, table = found("cf")
    plain_flags, flags = (set(t.loc[t["flagged"], "id"]) for t in (plain_table, table))
    print("flips in the top 20: plain", plain, "cross-fit", crossed, "; flagged flips: plain",
          len(plain_flags & truth), "of", len(plain_flags), "cross-fit", len(flags & truth), "of", len(flags))
    assert crossed >= plain and crossed >= 10
    assert len(flags & truth) >= 10 and len(flags & truth) >= len(plain_flags & truth) + 5
    code, _, err = run_cli(capsys, "selfcheck", "-c", str(path), "--shard", "0/2", "--cross-fit", "3")
    assert code == 2 and "--cross-fit" in err
