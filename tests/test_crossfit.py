"""selfcheck --cross-fit K: folds, out-of-fold outputs that never saw their row, and what it buys on a
model that memorizes its labels."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_parts_of_the_folds_sum_to_the_whole(tmp_path):
    """torchrun rank r of R trains the folds k with k mod R = r: the parts are disjoint in rows and sum exactly to
    one process's outputs (a fold's model depends on its seed, not on who trains it); a rank with no fold gives
    zeros of the output width."""
    path, _ = write_case(tmp_path, epochs=60)
    cfg = load_config(path)
    split = load_split(cfg.data.train, "train", cfg.task)
    objective = Objective(cfg.task, cfg.weight_decay)
    cpu = torch.device("cpu")
    whole = out_of_fold_outputs(cfg, split, objective, cpu, torch.float64, 3)
    parts = [out_of_fold_outputs(cfg, split, objective, cpu, torch.float64, 3, part=(r, 2)) for r in range(2)]
    folds = stratified_folds(split.labels.numpy(), 3, cfg.seed)
    assert not parts[0][folds == 1].any() and not parts[1][folds != 1].any()
    np.testing.assert_array_equal(parts[0] + parts[1], whole)
    idle = out_of_fold_outputs(cfg, split, objective, cpu, torch.float64, 3, part=(3, 4))
    assert idle.shape == whole.shape and not idle.any()


def test_cross_fit_finds_the_flips_a_memorizing_model_hides(capsys, tmp_path):
    """An MLP with little weight decay fits its 20 flipped labels: in-sample signals barely see them;
    the out-of-fold suspicion ranks more of them on top, flags them, and the manifest says how."""
    path, flipped = write_case(tmp_path, n=200, flips=20, hidden=32, wd=1e-6, epochs=1500)
    code, _, err = run_cli(capsys, "train", "-c", str(path), "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "plain"), "--quiet",
                           "--cross-fit", "0")
    assert code == 0, err
    code, out, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "cf"), "--cross-fit", "4",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["loo_loss_method"] == "cross_fit(4)"
    assert doc["suspicion_method"] == "rank_mean(loss,oof_loss,oof_margin)"
    assert doc["flag_method"] == "confident_learning_count(temperature_scaled_oof_probs),top_suspicion"
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


def test_auto_cross_fits_a_memorizing_model_within_budget_and_says_when_it_cannot(capsys, tmp_path):
    """selfcheck.cross_fit: auto (the default) runs 5 out-of-fold fits when the model memorized its labels: the
    same report as --cross-fit 5. Over budget it keeps one fit, warns, reports flags_trusted: false, and a
    --fail-above the undercounted flags would pass exits 1 instead of 0. A model that does not memorize is
    audited from one fit, trusted."""
    path, _ = write_case(tmp_path, n=200, flips=20, hidden=32, wd=1e-6, epochs=1500)
    assert run_cli(capsys, "train", "-c", str(path), "--quiet")[0] == 0
    code, out, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "auto"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    plan = doc["cross_fit"]
    assert plan["setting"] == "auto" and plan["memorized"] and plan["folds"] == 5
    assert 0 < plan["estimated_s"] <= plan["budget_s"] == 600
    assert doc["loo_loss_method"] == "cross_fit(5)" and doc["flags_trusted"] is True
    assert not any("memorized" in w for w in doc["warnings"])
    code, out, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "k5"), "--json",
                             "--cross-fit", "5")
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "auto" / "selfcheck.csv"),
                                  pd.read_csv(tmp_path / "k5" / "selfcheck.csv"))
    assert json.loads(out)["cross_fit"]["set_by"] == "--cross-fit"

    over = ("--set", "selfcheck.cross_fit_budget=0")
    code, out, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "over"), "--json", *over)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["cross_fit"]["folds"] is None and doc["flags_trusted"] is False
    assert doc["loo_loss_method"] != "cross_fit(5)"
    warning = next(w for w in doc["warnings"] if "memorized" in w)
    assert "selfcheck.cross_fit_budget (0 s)" in warning and "--cross-fit 5" in warning
    loose = str(doc["flagged_fraction"] + 0.5)  # a threshold the one-fit flags pass: not a pass
    code, _, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "over"), "--quiet", *over,
                           "--fail-above", loose)
    assert code == 1 and "cannot be held to --fail-above" in err
    code, _, err = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "auto"), "--quiet",
                           "--fail-above", loose)
    assert code == 0, err  # cross-fitted: trusted, under the threshold
    code, out, _ = run_cli(capsys, "selfcheck", "-c", str(path), "-o", str(tmp_path / "off"), "--json",
                           "--set", "selfcheck.cross_fit=0")
    doc = json.loads(out)
    assert doc["cross_fit"]["folds"] is None and "selfcheck.cross_fit: 0" in " ".join(doc["warnings"])

    (tmp_path / "lr").mkdir()
    logreg, _ = write_case(tmp_path / "lr", n=200, flips=20)
    assert run_cli(capsys, "train", "-c", str(logreg), "--quiet")[0] == 0
    code, out, err = run_cli(capsys, "selfcheck", "-c", str(logreg), "--json", "--fail-above", "0.5")
    assert code == 0, err
    doc = json.loads(out)
    assert not doc["cross_fit"]["memorized"] and doc["cross_fit"]["folds"] is None and doc["flags_trusted"]
    assert doc["loo_loss_method"] == "newton" and "estimated_s" not in doc["cross_fit"]


def test_cross_fit_settings_are_validated(tmp_path, capsys):
    path, _ = write_case(tmp_path)
    for bad in ("1", "-2", "true", "sometimes"):
        code, _, err = run_cli(capsys, "check", "-c", str(path), "--set", f"selfcheck.cross_fit={bad}")
        assert code == 2 and "selfcheck.cross_fit" in err, (bad, err)
    code, _, err = run_cli(capsys, "check", "-c", str(path), "--set", "selfcheck.cross_fit_budget=-1")
    assert code == 2 and "cross_fit_budget" in err
    code, _, err = run_cli(capsys, "selfcheck", "-c", str(path), "--cross-fit", "1")
    assert code == 2 and "--cross-fit" in err


def test_the_estimate_bounds_the_trainings_it_plans(tmp_path):
    """estimate_seconds prices the 5 trainings within a factor 3 (a shared machine's noise) when they run the whole
    recipe (L-BFGS that stops at tol earlier takes less), and counts the recipe's passes."""
    import time
    from dataclasses import replace

    from influence_cli.crossfit import estimate_seconds, training_passes

    path, _ = write_case(tmp_path, n=300, flips=30, hidden=16, wd=1e-6, epochs=200)
    cfg = load_config(path)
    split = load_split(cfg.data.train, "train", cfg.task)
    objective = Objective(cfg.task, cfg.weight_decay)
    estimate = estimate_seconds(cfg, split, objective, torch.device("cpu"), torch.float32, 5)
    start = time.perf_counter()
    out_of_fold_outputs(cfg, split, objective, torch.device("cpu"), torch.float32, 5)
    took = time.perf_counter() - start
    print(f"estimate {estimate:.2f} s, took {took:.2f} s")
    assert took / 3 <= estimate <= 3 * took  # 200 L-BFGS iterations each (tol 1e-9 is not reached): what it prices
    assert training_passes(cfg) == 200 * 5 // 4 + 1
    adam = replace(cfg, train=replace(cfg.train, optimizer="adam", epochs=7))
    assert training_passes(adam) == 8


def test_the_memorization_rule_counts_a_model_that_fits_all_but_one_of_150_labels():
    """A classifier that predicts at least 99% of its training labels (or has mean loss under 0.02) memorized
    them: one fit cannot show more than a 1% error rate. A 150-row MLP that fits 149 noisy labels (99.3%, mean
    loss 0.03) is one (at 99.5% it was not, and iris was audited from one fit); 98.5% is not; regression never."""
    from types import SimpleNamespace

    from influence_cli.commands.selfcheck import SelfcheckOptions, _cross_fit_plan

    run = SimpleNamespace(cfg=SimpleNamespace(selfcheck=SimpleNamespace(cross_fit=0)), merge=False)
    options = SelfcheckOptions()

    def memorized(loss, accuracy):
        return _cross_fit_plan(run, options, loss, accuracy, 150)[1]["memorized"]

    assert memorized(0.03, 149 / 150) and memorized(0.01, 0.9)
    assert not memorized(0.03, 0.985) and not memorized(0.001, None)


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_the_checkpoint_fit_torchrun_decides_on_equals_the_scored_rows(name):
    """Under torchrun the memorization test runs before the scoring pass, on one forward pass (summed over the
    ranks): its mean loss and accuracy equal what one process reads from the scored rows (binary, classification)."""
    from influence_cli.commands.selfcheck import _checkpoint_fit, _scored_rows
    from influence_cli.run import Run

    root = Path(__file__).resolve().parents[1]
    run = Run.open(load_config(root / "configs" / f"{name}.yaml"), "selfcheck")
    run.fit()
    mean, accuracy, n = _checkpoint_fit(run)
    rows = _scored_rows(run)
    labels = run.train.labels.numpy().reshape(n).astype(np.int64)
    assert n == run.train.n
    assert mean == pytest.approx(float(rows["loss"].mean()), rel=1e-9)
    assert accuracy == pytest.approx(float((rows["pred"] == labels).mean()))
