"""End to end through the CLI entry point on the sample digits: exit codes, files, stdout/stderr."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli as run

from influence_cli import cli
from influence_cli.commands import selfcheck as selfcheck_module

ROOT = Path(__file__).resolve().parents[1]
SELFCHECK_HEADER = "rank,id,label,predicted,prob_label,loss,self_influence,suspicion,flagged,suggested_label"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A copy of the digits sample with its own config and a trained checkpoint."""
    root = tmp_path_factory.mktemp("digits")
    shutil.copytree(ROOT / "sample_data" / "digits", root / "data")
    (root / "config.yaml").write_text(
        "model: {arch: logreg, kwargs: {in_features: 64, num_classes: 10}, checkpoint: data/logreg.pt}\n"
        "data:\n"
        "  train: {format: csv, path: data/train.csv, label: label, id: id, carry: [source]}\n"
        "  test: {format: csv, path: data/test.csv, label: label, id: id, carry: [source]}\n"
        "weight_decay: 0.001\n"
        "train: {epochs: 300}\n"
        "output: {dir: reports}\n"
    )
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "-c", str(root / "config.yaml"), "--quiet"])
    assert exc.value.code == 0
    return root


@pytest.fixture()
def cfg(workspace) -> str:
    return str(workspace / "config.yaml")


def test_train_reports_convergence(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "train", "-c", cfg, "--json", "--set", f"model.checkpoint={tmp_path / 'm.pt'}")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["converged"] is True and doc["grad_norm"] < 1e-5
    assert (tmp_path / "m.pt").is_file()


def test_selfcheck_writes_spec_csv_and_manifest(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--top", "3")
    assert code == 0, err
    assert "most suspect training examples (by suspicion)" in out and "error" not in err
    assert "estimated label error rate" in out
    text = (tmp_path / "selfcheck.csv").read_text()
    assert text.splitlines()[0] == SELFCHECK_HEADER + ",loss_rank,loo_loss,source"  # SPEC columns first
    table = pd.read_csv(tmp_path / "selfcheck.csv")
    assert len(table) == 1437 and table["id"].is_unique
    assert (table["rank"] == np.arange(1, 1438)).all()
    assert (np.diff(table["suspicion"]) <= 0).all() and (table["self_influence"] >= 0).all()  # SPEC's sort
    assert ((table["suspicion"] > 0) & (table["suspicion"] <= 1)).all()
    flagged = table[table["flagged"]]
    assert len(flagged) > 0
    assert (flagged["suggested_label"] != flagged["label"]).all() and flagged["suggested_label"].notna().all()
    assert table.loc[~table["flagged"], "suggested_label"].isna().all()
    assert ((table["prob_label"] > 0) & (table["prob_label"] <= 1)).all()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("command", "config", "versions", "checkpoint_sha256", "datasets", "n", "parameters", "solver",
                "phases_seconds", "memory", "summary"):
        assert key in manifest, key
    assert manifest["parameters"] == 650 and manifest["solver"]["factorization"] == "cholesky"
    assert manifest["summary"]["suspicion_method"] == "weighted_rank_mean(loss:0.8,loo_loss:0.1,loo_margin:0.1)"
    lo, hi = manifest["summary"]["estimated_error_rate_ci90"]
    assert lo <= manifest["summary"]["estimated_error_rate"] <= hi


def test_selfcheck_finds_the_flipped_labels(capsys, cfg, tmp_path, workspace):
    assert run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--quiet")[0] == 0
    table = pd.read_csv(tmp_path / "selfcheck.csv").merge(pd.read_csv(workspace / "data" / "answer_key.csv"), on="id")
    top = table.head(len(table) // 10)
    assert top["flipped"].sum() / table["flipped"].sum() >= 0.8


def test_json_is_the_only_stdout(capsys, cfg, tmp_path):
    code, out, _ = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["n"] == 1437 and doc["threshold_breached"] is False


def test_quiet_prints_nothing(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--quiet")
    assert (code, out, err) == (0, "", "")


def test_fail_above_exits_1_after_writing(capsys, cfg, tmp_path):
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--fail-above", "0.001")
    assert code == 1 and "fail-above" in err
    assert (tmp_path / "selfcheck.csv").is_file()
    assert run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--fail-above", "0.9")[0] == 0


def test_rank_tables(capsys, cfg, tmp_path):
    code, _, err = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path), "--top", "4", "--test-ids", "d0029,d0022")
    assert code == 0, err
    helpful, harmful = pd.read_csv(tmp_path / "helpful.csv"), pd.read_csv(tmp_path / "harmful.csv")
    header = "test_id,test_label,rank,train_id,train_label,loss_change_if_removed"
    assert (tmp_path / "helpful.csv").read_text().startswith(header + ",source\n")
    assert list(helpful["test_id"].unique()) == ["d0029", "d0022"]
    for _, group in helpful.groupby("test_id"):
        assert list(group["rank"]) == [1, 2, 3, 4] and (np.diff(group["loss_change_if_removed"]) <= 0).all()
    for _, group in harmful.groupby("test_id"):
        assert (np.diff(group["loss_change_if_removed"]) >= 0).all()
    overall = pd.read_csv(tmp_path / "overall.csv")
    assert list(overall.columns[:4]) == ["rank", "id", "label", "loss_change_if_removed"]
    assert len(overall) == 1437 and (np.diff(overall["loss_change_if_removed"]) >= 0).all()


def test_rank_subset_is_a_slice_of_the_full_run(capsys, cfg, tmp_path):
    assert run(capsys, "rank", "-c", cfg, "-o", str(tmp_path / "all"), "--top", "5", "--quiet")[0] == 0
    assert run(capsys, "rank", "-c", cfg, "-o", str(tmp_path / "one"), "--top", "5", "--test-ids", "d0035",
               "--quiet")[0] == 0
    full = pd.read_csv(tmp_path / "all" / "helpful.csv")
    one = pd.read_csv(tmp_path / "one" / "helpful.csv")
    pd.testing.assert_frame_equal(full[full["test_id"] == "d0035"].reset_index(drop=True), one, rtol=1e-6)


def test_rank_overall_is_mean_of_per_test_effects(capsys, cfg, tmp_path):
    ids = "d0022,d0029"
    run(capsys, "rank", "-c", cfg, "-o", str(tmp_path), "--top", "1437", "--test-ids", ids, "--quiet")
    helpful = pd.read_csv(tmp_path / "helpful.csv")
    mean = helpful.groupby("train_id")["loss_change_if_removed"].mean()
    overall = pd.read_csv(tmp_path / "overall.csv").set_index("id")["loss_change_if_removed"]
    # per-test values come from float32 solves x float32 gradients in a float32 run; overall.csv is float64
    np.testing.assert_allclose(overall.loc[mean.index], mean, rtol=1e-6, atol=1e-5 * float(np.abs(mean).max()))


def test_unknown_test_id_is_exit_2(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path), "--test-ids", "nope")
    assert code == 2 and err.startswith("error: --test-ids") and out == ""


def _write_report(capsys, cfg, out_dir) -> bytes:
    assert run(capsys, "selfcheck", "-c", cfg, "-o", str(out_dir), "--quiet")[0] == 0
    return (out_dir / "selfcheck.csv").read_bytes()


@pytest.mark.parametrize(("overrides", "code", "needle"), [
    (["--set", "solver.nmae=cg"], 2, "solver.nmae: unknown key"),
    (["--set", "solver.damping=lots"], 2, "solver.damping"),
    (["--set", "model.checkpoint=missing.pt"], 2, "model.checkpoint"),
    (["--set", "data.train.path=missing.csv"], 2, "missing.csv"),
    (["--set", "data.train.label=nolabel"], 2, "nolabel"),
    (["--set", "model.arch=mlp", "--set", "model.kwargs={in_features: 64, hidden: [8], num_classes: 10}"], 3,
     "does not fit"),
    (["--set", "model.kwargs.num_classes=5"], 3, "does not fit"),
    (["--set", "task=regresion"], 2, "did you mean regression"),
    (["--set", "solver.memory_limit_gb=0.000001"], 2, "last_layer"),
    (["--set", "device=cuda:7"], 2, "device"),
])
def test_bad_input_exit_codes_leave_report_untouched(capsys, cfg, tmp_path, overrides, code, needle):
    before = _write_report(capsys, cfg, tmp_path)
    got, out, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), *overrides)
    assert got == code, err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) <= 2
    assert (tmp_path / "selfcheck.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".infl-cache") == [
        ".infl-report.json", "classes.csv", "manifest.json", "selfcheck.csv", "selfcheck.manifest.json"]


@pytest.mark.parametrize("kind", ["text_feature", "nan_feature", "empty", "label_out_of_range"])
def test_bad_data_is_exit_3(capsys, workspace, tmp_path, kind):
    table = pd.read_csv(workspace / "data" / "train.csv")
    row_id = table["id"][7]
    if kind == "text_feature":
        table["p3"] = table["p3"].astype(object)
        table.loc[7, "p3"] = "oops"
        needles = ["p3"]
    elif kind == "nan_feature":
        table.loc[7, "p5"] = np.nan
        needles = [row_id]
    elif kind == "empty":
        table = table.iloc[:0]
        needles = ["empty"]
    else:
        table.loc[7, "label"] = 12
        needles = [row_id, "out of range"]
    table.to_csv(tmp_path / "bad.csv", index=False)
    code, out, err = run(capsys, "selfcheck", "-c", str(workspace / "config.yaml"), "-o", str(tmp_path / "r"),
                         "--set", f"data.train.path={tmp_path / 'bad.csv'}")
    assert code == 3, err
    assert err.startswith("error: ") and out == "" and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "r").exists()


def test_malformed_yaml_and_missing_option(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("model: {arch: [unclosed\n")
    code, _, err = run(capsys, "check", "-c", str(tmp_path / "c.yaml"))
    assert code == 2 and err.startswith("error: ") and "YAML" in err
    code, _, err = run(capsys, "selfcheck")
    assert code == 2 and err.startswith("error: ") and "--config" in err


def test_internal_error_is_exit_4_and_interrupt_130(capsys, cfg, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(selfcheck_module, "selfcheck", boom)
    code, _, err = run(capsys, "selfcheck", "-c", cfg)
    assert code == 4 and "internal error" in err and "--debug" in err and "Traceback" not in err

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfcheck_module, "selfcheck", interrupt)
    assert run(capsys, "selfcheck", "-c", cfg)[0] == 130

    def signal_swallowed_by_cpp(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises KeyboardInterrupt here...
        except KeyboardInterrupt as e:
            raise RuntimeError("unexpected pos 25728 vs 25680") from e  # ...which torch's C++ rewraps
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(selfcheck_module, "selfcheck", signal_swallowed_by_cpp)
    code, _, err = run(capsys, "selfcheck", "-c", cfg)
    assert code == 130 and err.startswith("error: interrupted"), err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored
    monkeypatch.setattr(selfcheck_module, "selfcheck", boom)
    assert run(capsys, "selfcheck", "-c", cfg)[0] == 4  # the next command starts with no interruption noted


def test_check_prints_facts(capsys, cfg):
    code, out, err = run(capsys, "check", "-c", cfg)
    assert code == 0, err
    assert "parameters: 650" in out and "train rows: 1437" in out and "direct" in out
    assert out.startswith("train rows") and "config:" not in out  # the answer first, the config on request
    code, out, _ = run(capsys, "check", "-c", cfg, "--show-config")
    assert code == 0 and "config:" in out and out.index("train rows") < out.index("config:")
    code, out, _ = run(capsys, "check", "-c", cfg, "--json")
    assert json.loads(out)["parameters"] == 650
    assert json.loads(out)["selected_by_module"] == {"linear": 650}
    plan = json.loads(out)["cross_fit"]  # what selfcheck's out-of-fold fits would cost, if the model memorized
    assert plan["setting"] == "auto" and plan["folds"] == 5 and 0 < plan["estimated_s"] and plan["budget_s"] == 600
    code, out, _ = run(capsys, "check", "-c", str(ROOT / "configs" / "digits_mlp.yaml"))
    assert code == 0 and "selected by module: " in out and "5 out-of-fold trainings" in out
    code, out, _ = run(capsys, "check", "-c", cfg, "--json", "--set", "selfcheck.cross_fit=0")
    assert "cross_fit" not in json.loads(out)


def test_same_inputs_give_identical_csvs(capsys, cfg, tmp_path):
    a = _write_report(capsys, cfg, tmp_path / "a")
    b = _write_report(capsys, cfg, tmp_path / "b")
    assert a == b


def test_selfcheck_rank_by_and_signal_columns(capsys, cfg, tmp_path):
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--quiet", "--rank-by", "loss")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "selfcheck.csv")
    assert list(table.columns) == SELFCHECK_HEADER.split(",") + ["loss_rank", "loo_loss", "source"]
    assert table["loss"].is_monotonic_decreasing and (table["loss_rank"] == np.arange(1, len(table) + 1)).all()
    assert (table["loo_loss"] >= table["loss"] - 1e-9).all()  # leaving a row out cannot make its fit better
    code, out, _ = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--json", "--rank-by", "loo_loss")
    assert json.loads(out)["loo_loss_method"] == "newton"
    assert pd.read_csv(tmp_path / "selfcheck.csv")["loo_loss"].is_monotonic_decreasing
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--rank-by", "nonsense")
    assert code == 2 and "--rank-by" in err


def test_rank_groups_csv_puts_the_noisy_annotator_first(capsys, workspace, tmp_path):
    table = pd.read_csv(workspace / "data" / "train.csv")
    key = pd.read_csv(workspace / "data" / "answer_key.csv").set_index("id")
    flipped = key.loc[table["id"], "flipped"].to_numpy() == 1
    table["source"] = np.where(flipped, "annotator_bad", table["source"])  # one annotator holds every flip
    table.to_csv(tmp_path / "train.csv", index=False)
    code, _, err = run(capsys, "rank", "-c", str(workspace / "config.yaml"), "-o", str(tmp_path / "r"), "--quiet",
                       "--set", f"data.train.path={tmp_path / 'train.csv'}", "--set",
                       f"model.checkpoint={workspace / 'data' / 'logreg.pt'}", "--group-by", "source")
    assert code == 0, err
    groups = pd.read_csv(tmp_path / "r" / "groups.csv")
    assert list(groups.columns) == ["group", "size", "loss_change_if_removed", "method",
                                    "loss_change_if_removed_newton", "loss_change_if_removed_1st",
                                    "loss_change_if_removed_2nd", "curvature_share", "trusted"]
    assert groups["group"][0] == "annotator_bad" and groups["size"][0] == flipped.sum()
    assert groups["loss_change_if_removed"].is_monotonic_increasing
    code, _, err = run(capsys, "rank", "-c", str(workspace / "config.yaml"), "-o", str(tmp_path / "r"),
                       "--group-by", "nope")
    assert code == 2 and "--group-by" in err


def test_verify_agrees_with_retraining_and_min_pearson(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "verify", "-c", cfg, "-o", str(tmp_path), "--samples", "6", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["pearson"] >= 0.95 and doc["samples"] == 6
    table = pd.read_csv(tmp_path / "verify.csv")
    assert list(table.columns[:3]) == ["train_id", "predicted_loss_change", "actual_loss_change"]
    assert len(table) == 6
    code, _, err = run(capsys, "verify", "-c", cfg, "-o", str(tmp_path), "--samples", "4", "--min-pearson",
                       str(doc["pearson"] + 1e-9), "--quiet")
    assert code == 1, err


@pytest.mark.parametrize(("argv", "option"), [
    (["selfcheck", "--fail-above", "2"], "--fail-above"), (["selfcheck", "--fail-above", "-0.1"], "--fail-above"),
    (["selfcheck", "--top", "0"], "--top"), (["selfcheck", "--top", "-1"], "--top"),
    (["rank", "--top", "0"], "--top"), (["rank", "--knn", "0"], "--knn"),
    (["verify", "--min-pearson", "1.01"], "--min-pearson"), (["verify", "--samples", "1"], "--samples"),
    (["verify", "--workers", "0"], "--workers")])
def test_thresholds_that_never_or_always_fire_are_usage_errors(capsys, cfg, tmp_path, argv, option):
    code, out, err = run(capsys, argv[0], "-c", cfg, "-o", str(tmp_path / "r"), *argv[1:])
    assert code == 2 and err.startswith("error: ") and option in err and out == ""
    assert not (tmp_path / "r").exists()


def test_fail_on_new_below_zero_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "diff", str(tmp_path), str(tmp_path), "--fail-on-new", "-1")
    assert code == 2 and "--fail-on-new" in err


def test_damping_sweep_reports_agreement(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--json", "--damping-sweep")
    assert code == 0, err
    sweep = json.loads(out)["damping_sweep"]
    assert sweep["x0.1"]["damping"] == pytest.approx(1e-4) and sweep["x10"]["damping"] == pytest.approx(1e-2)
    assert 0.9 < sweep["x0.1"]["spearman"] <= 1.0


def test_rank_knn_scores_only_neighbors(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path), "--knn", "50", "--test-ids", "d0022",
                         "--top", "5", "--json")
    assert code == 0, err
    knn = json.loads(out)["knn"]
    # the default metric, kfac, takes the K most helpful and the K most harmful candidates
    assert knn["metric"] == "kfac" and knn["scored_rows"] == 100 and knn["k"] == 50
    overall = pd.read_csv(tmp_path / "overall.csv")
    assert len(overall) == 100 and overall["loss_change_if_removed"].is_monotonic_increasing
    assert set(pd.read_csv(tmp_path / "helpful.csv")["train_id"]) <= set(overall["id"])


def test_auto_solver_and_check_reason(capsys, cfg):
    code, out, err = run(capsys, "check", "-c", cfg, "--set", "solver.name=auto", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["solver"] == "direct" and "fits in memory" in doc["solver_reason"]
    assert set(doc["solver_estimates"]) == {"direct", "cg", "lissa", "arnoldi", "ekfac"}
    code, out, err = run(capsys, "check", "-c", cfg, "--set", "solver.name=auto", "--set",
                         "solver.memory_limit_gb=0.000001", "--json")
    assert json.loads(out)["solver"] == "ekfac"


def test_approximate_solver_reports_agreement_with_exact(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--json", "--set",
                         "solver.name=ekfac")
    assert code == 0, err
    check = json.loads(out)["exact_check"]
    assert check["rows"] == 256 and check["self_influence_spearman_vs_direct"] > 0.95


def test_diff_new_persistent_resolved_and_fail_on_new(capsys, tmp_path):
    def report(folder, rows):
        folder.mkdir()
        pd.DataFrame(rows, columns=["rank", "id", "label", "self_influence", "flagged"]).to_csv(
            folder / "selfcheck.csv", index=False)
        (folder / "manifest.json").write_text("{}")

    report(tmp_path / "old", [(1, "a", 1, 9.0, True), (2, "b", 0, 5.0, True), (3, "c", 1, 1.0, False)])
    report(tmp_path / "new", [(1, "c", 1, 8.0, True), (2, "a", 1, 7.0, True), (3, "b", 0, 0.5, False),
                              (4, "d", 2, 0.1, False)])
    code, out, err = run(capsys, "diff", str(tmp_path / "old"), str(tmp_path / "new"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["new"], doc["persistent"], doc["resolved"]) == (1, 1, 1)
    table = pd.read_csv(tmp_path / "new" / "diff.csv")
    assert list(table["id"]) == ["c", "a", "b"] and list(table["status"]) == ["new", "persistent", "resolved"]
    assert (tmp_path / "new" / "manifest.json").read_text() == "{}"  # the report itself is untouched
    assert run(capsys, "diff", str(tmp_path / "old"), str(tmp_path / "new"), "--fail-on-new", "0", "--quiet")[0] == 1
    code, _, err = run(capsys, "diff", str(tmp_path / "old"), str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: NEW_DIR")


def test_concurrent_writers_take_turns(tmp_path):
    import threading

    from influence_cli import report

    barrier, done = threading.Barrier(4), []

    def write(i):
        barrier.wait()
        frame = pd.DataFrame({"writer": [i] * 2000})
        report.write_atomic(tmp_path, {"a.csv": frame, "b.csv": frame}, {"writer": i})
        done.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert a["writer"].nunique() == 1 and a["writer"][0] == b["writer"][0] == manifest["writer"] == done[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "manifest.json"]


@pytest.mark.parametrize("command", ["selfcheck", "rank", "verify", "train", "check"])
def test_every_spec_command_takes_the_common_options(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for option in ("--config", "-c", "--out", "-o", "--set", "--quiet", "--json"):
        assert option in out, (command, option)


def test_command_summaries_in_infl_help_are_whole_on_an_80_column_terminal(capsys, monkeypatch):
    """Click cuts a command's summary with '...' to fit the terminal: each command's short_help fits 80 columns
    whole, and every command is listed."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    listed = out[out.index("Commands:"):].splitlines()[1:]
    names = {line.split()[0] for line in listed if line.strip()}
    assert {"selfcheck", "rank", "verify", "fix", "explain", "report", "init", "diff", "train", "check"} <= names
    for line in listed:
        assert "..." not in line and len(line) <= 80, line


@pytest.mark.parametrize(("command", "option", "choices"), [
    ("selfcheck", "--rank-by", "influence_cli.commands.selfcheck:RANK_BY"),
    ("selfcheck", "--gallery", "influence_cli.commands.selfcheck:GALLERIES"),
    ("rank", "--knn-metric", "influence_cli.knn:METRICS")])
def test_choice_options_show_their_choices_as_the_metavar(command, option, choices, capsys, monkeypatch):
    """The metavar lists exactly the values the command accepts (the list lives in cli.py as text so that
    --help imports no torch: this keeps the two equal)."""
    import importlib

    monkeypatch.setenv("COLUMNS", "200")
    module, name = choices.split(":")
    accepted = set(getattr(importlib.import_module(module), name))
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    shown = re.search(re.escape(option) + r" \[([^\]]+)\]", out)
    assert shown is not None, out
    assert set(shown.group(1).split("|")) == accepted


def test_stdout_closed_by_the_reader_is_a_quiet_exit_0(cfg, tmp_path):
    """`infl selfcheck | head -1`: the reader goes away; no message, no traceback, the command's own code."""
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from influence_cli.cli import main; main()", "selfcheck", "-c", cfg, "-o",
           str(tmp_path), "--top", "1437"]  # a table larger than the pipe's buffer
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as head -1 does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "error" not in err and "Exception ignored" not in err
    assert (tmp_path / "selfcheck.csv").is_file()


def test_damping_sweep_keeps_the_commands_options(capsys, cfg, tmp_path):
    """rank --knn K --damping-sweep sweeps the kNN ranking itself (same candidate rows), not a full one."""
    code, out, err = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path), "--knn", "5", "--damping-sweep", "--json",
                         "--test-ids", "d0022")
    assert code == 0, err
    doc = json.loads(out)
    overall = pd.read_csv(tmp_path / "overall.csv")
    assert len(overall) == doc["knn"]["scored_rows"] < 1437  # the swept tables had these rows too (.loc by id)
    assert set(doc["damping_sweep"]) >= {"x0.1", "x10"} and doc["damping_sweep"]["x0.1"]["spearman"] > 0.5
    code, out, _ = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path), "--knn", "5", "--damping-sweep",
                       "--test-ids", "d0022")
    assert code == 0 and "damping sweep of loss_change_if_removed" in out


def test_selfcheck_writes_class_and_group_health(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--group-by", "source")
    assert code == 0, err
    classes = pd.read_csv(tmp_path / "classes.csv")
    assert list(classes.columns) == ["label", "rows", "flagged", "estimated_error_rate", "top_suggested_label"]
    report = pd.read_csv(tmp_path / "selfcheck.csv")
    assert classes.rows.sum() == len(report) and classes.flagged.sum() == report.flagged.sum()
    groups = pd.read_csv(tmp_path / "selfcheck_groups.csv")
    assert list(groups.columns) == ["group", "rows", "flagged", "estimated_error_rate", "mean_suspicion"]
    assert groups.rows.sum() == len(report) and set(groups.group) == set(report.source)
    assert "classes: estimated error rate" in out and "groups: estimated error rate" in out


def test_help_and_version_answer_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from influence_cli.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported for --version'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("infl ")


def test_interrupt_message_promises_shards_only_where_there_are_some(capsys, cfg, monkeypatch):
    from influence_cli.commands import train as train_module

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupt)
    monkeypatch.setattr(selfcheck_module, "selfcheck", interrupt)
    code, _, err = run(capsys, "train", "-c", cfg)
    assert code == 130 and err.startswith("error: interrupted") and "shards" not in err
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "--no-cache")
    assert code == 130 and "shards" not in err
    code, _, err = run(capsys, "selfcheck", "-c", cfg)
    assert code == 130 and "rerun the same command to resume" in err


def test_test_columns_in_another_order_give_the_same_answer(capsys, workspace, tmp_path):
    """Features are matched by name: a test CSV with its columns shuffled changes nothing."""
    cfg_path = workspace / "config.yaml"
    assert run(capsys, "rank", "-c", str(cfg_path), "-o", str(tmp_path / "a"), "--quiet")[0] == 0
    test = pd.read_csv(workspace / "data" / "test.csv")
    cols = list(test.columns)
    shuffled = cols[:1] + cols[1:][::-1]
    test[shuffled].to_csv(tmp_path / "test_shuffled.csv", index=False)
    code, _, err = run(capsys, "rank", "-c", str(cfg_path), "-o", str(tmp_path / "b"), "--quiet",
                       "--set", f"data.test.path={tmp_path / 'test_shuffled.csv'}")
    assert code == 0, err
    assert (tmp_path / "a" / "overall.csv").read_bytes() == (tmp_path / "b" / "overall.csv").read_bytes()
    test.drop(columns=[cols[-1]]).to_csv(tmp_path / "test_missing.csv", index=False)
    code, _, err = run(capsys, "rank", "-c", str(cfg_path), "-o", str(tmp_path / "c"), "--quiet",
                       "--set", f"data.test.path={tmp_path / 'test_missing.csv'}")
    assert code == 3 and cols[-1] in err


def test_a_model_that_fits_nothing_is_warned_about_where_the_user_looks(capsys, cfg, workspace, tmp_path):
    import torch

    state = torch.load(workspace / "data" / "logreg.pt", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "zero.pt")
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path / "r"), "--no-cache",
                       "--set", f"model.checkpoint={tmp_path / 'zero.pt'}")
    assert code == 0 and "warning: training accuracy" in err and "under 50%" in err and "not at a minimum" in err


def test_rank_warns_about_a_model_that_fits_nothing_and_reports_its_accuracy(capsys, cfg, workspace, tmp_path):
    """rank counts the training rows it predicts right in its scoring pass: under 50% is a warning in the
    terminal and the manifest; a model that fits is not warned about."""
    import torch

    state = torch.load(workspace / "data" / "logreg.pt", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "zero.pt")
    code, out, err = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path / "r"), "--no-cache", "--json",
                         "--set", f"model.checkpoint={tmp_path / 'zero.pt'}")
    doc = json.loads(out)
    assert code == 0 and doc["train_accuracy"] < 0.5
    assert any("training accuracy" in w and "under 50%" in w for w in doc["warnings"])
    code, out, err = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path / "ok"), "--no-cache", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["train_accuracy"] >= 0.5
    assert not any("training accuracy" in w for w in doc["warnings"])


def test_explain_is_rank_restricted_to_one_test_row(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "explain", "d0022", "-c", cfg, "-o", str(tmp_path / "e"), "--top", "4", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["test_id"] == "d0022" and doc["loss"] > 0 and doc["predicted"] != ""
    table = pd.read_csv(tmp_path / "e" / "explain.csv", dtype={"test_id": str})
    assert list(table.columns[:8]) == ["test_id", "test_label", "predicted", "direction", "rank", "train_id",
                                       "train_label", "loss_change_if_removed"]
    assert run(capsys, "rank", "-c", cfg, "-o", str(tmp_path / "r"), "--top", "4", "--test-ids", "d0022",
               "--quiet")[0] == 0
    for direction in ("helpful", "harmful"):
        ranked = pd.read_csv(tmp_path / "r" / f"{direction}.csv")
        mine = table[table.direction == direction]
        assert mine.train_id.tolist() == ranked.train_id.tolist()
        np.testing.assert_array_equal(mine.loss_change_if_removed.to_numpy(), ranked.loss_change_if_removed.to_numpy())
    code, _, err = run(capsys, "explain", "nope", "-c", cfg, "-o", str(tmp_path / "e"))
    assert code == 2 and "nope" in err


def test_verify_with_too_few_rows_for_an_interval_says_so_and_writes_null(capsys, cfg, tmp_path):
    code, out, err = run(capsys, "verify", "-c", cfg, "-o", str(tmp_path), "--samples", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["pearson_ci95"] == [None, None] and "too few to bootstrap" in err
    assert "nan" not in (tmp_path / "manifest.json").read_text().lower().replace("nanos", "")
    code, out, _ = run(capsys, "verify", "-c", cfg, "-o", str(tmp_path), "--samples", "2")
    assert "no 95% CI: too few rows" in out and "nan" not in out
