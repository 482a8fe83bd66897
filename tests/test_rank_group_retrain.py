"""rank's groups.csv measured by retraining (rank.group_retrain, commands/rank_groups.py), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli as run

from influence_cli.commands import rank as rank_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """400 rows of the digits sample, four annotator groups, a trained logistic regression."""
    root = tmp_path_factory.mktemp("groups")
    data = root / "data"
    data.mkdir()
    pd.read_csv(ROOT / "sample_data/digits/train.csv").head(400).to_csv(data / "train.csv", index=False)
    pd.read_csv(ROOT / "sample_data/digits/test.csv").head(100).to_csv(data / "test.csv", index=False)
    (root / "config.yaml").write_text(
        "model: {arch: logreg, kwargs: {in_features: 64, num_classes: 10}, checkpoint: data/logreg.pt}\n"
        "data:\n"
        "  train: {format: csv, path: data/train.csv, label: label, id: id, group: source}\n"
        "  test: {format: csv, path: data/test.csv, label: label, id: id}\n"
        "weight_decay: 0.01\n"
        "train: {epochs: 300}\n"
        "output: {dir: reports}\n")
    from influence_cli import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "-c", str(root / "config.yaml"), "--quiet"])
    assert exc.value.code == 0
    return root


def _rank(capsys, small: Path, out: Path, *sets: str) -> tuple[pd.DataFrame, dict, str]:
    argv = ["rank", "-c", str(small / "config.yaml"), "-o", str(out), "--json", "--top", "3"]
    for s in sets:
        argv += ["--set", s]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    return pd.read_csv(out / "groups.csv"), json.loads(stdout), err


def test_retrained_groups_equal_verify_groups(capsys, small, tmp_path):
    """group_retrain: true measures every group as `infl verify --groups` does: the same retrains."""
    frame, doc, _ = _rank(capsys, small, tmp_path / "r", "rank.group_retrain=true")
    assert list(frame.columns[:5]) == ["group", "size", "loss_change_if_removed", "method",
                                       "loss_change_if_removed_newton"]
    assert (frame["method"] == "retrained").all() and frame["trusted"].all()
    assert frame["loss_change_if_removed"].is_monotonic_increasing
    assert len(doc["group_retrain"]["retrained"]) == len(frame) == 4
    code, _, err = run(capsys, "verify", "-c", str(small / "config.yaml"), "-o", str(tmp_path / "v"), "--groups",
                       "--samples", "2", "--quiet")
    assert code == 0, err
    verify = pd.read_csv(tmp_path / "v" / "groups_verify.csv").set_index("group")
    mine = frame.set_index("group").loc[verify.index]
    np.testing.assert_allclose(mine["loss_change_if_removed"], verify["actual_loss_change"], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(mine["loss_change_if_removed_newton"], verify["loss_change_if_removed"], rtol=1e-9)
    # on logistic regression the Newton estimate is close to the retrained change (README, group table)
    np.testing.assert_allclose(mine["loss_change_if_removed_newton"], mine["loss_change_if_removed"], rtol=0.3)


def test_auto_retrains_only_untrusted_groups_within_the_budget(capsys, small, tmp_path, monkeypatch):
    frame, doc, err = _rank(capsys, small, tmp_path / "plain")  # logistic regression: every estimate trusted
    assert (frame["method"] == "newton").all() and doc["group_retrain"]["retrained"] == []
    np.testing.assert_array_equal(frame["loss_change_if_removed"], frame["loss_change_if_removed_newton"])
    assert "groups.csv" not in err

    real = rank_module.group_effects

    def one_untrusted(*args, **kwargs):
        out = real(*args, **kwargs)
        out["trusted"] = out["group"] != "annotator_b"
        return out

    monkeypatch.setattr(rank_module, "group_effects", one_untrusted)
    out = tmp_path / "auto"
    frame, doc, err = _rank(capsys, small, out)
    methods = dict(zip(frame["group"], frame["method"], strict=True))
    assert methods == {"annotator_a": "newton", "annotator_b": "retrained", "annotator_c": "newton",
                       "annotator_d": "newton"}
    assert [r["group"] for r in doc["group_retrain"]["retrained"]] == ["annotator_b"]
    assert doc["group_retrain"]["retrained"][0]["reused"] is False and "groups.csv" not in err
    again, doc, _ = _rank(capsys, small, out)  # the measured change is cached: nothing retrained
    assert doc["group_retrain"]["retrained"][0]["reused"] is True
    pd.testing.assert_frame_equal(again, frame)

    frame, doc, err = _rank(capsys, small, tmp_path / "budget", "rank.group_retrain_budget=0")
    assert (frame["method"] == "newton").all() and doc["group_retrain"]["not_retrained"] == ["annotator_b"]
    assert "annotator_b" in err and "rank.group_retrain_budget (0 s)" in err and "infl verify --groups" in err

    frame, doc, err = _rank(capsys, small, tmp_path / "off", "rank.group_retrain=false")
    assert (frame["method"] == "newton").all() and "rank.group_retrain is false" in err


def test_bad_budget_is_a_config_error(capsys, small, tmp_path):
    code, _, err = run(capsys, "rank", "-c", str(small / "config.yaml"), "-o", str(tmp_path),
                       "--set", "rank.group_retrain_budget=-1")
    assert code == 2 and "group_retrain_budget" in err


def test_check_prices_the_group_retrains(capsys, small):
    code, out, err = run(capsys, "check", "-c", str(small / "config.yaml"), "--json")
    assert code == 0, err
    plan = json.loads(out)["group_retrain"]
    assert plan["setting"] == "auto" and plan["groups"] == 4 and plan["each_s"] > 0 and plan["budget_s"] == 600
    code, out, _ = run(capsys, "check", "-c", str(small / "config.yaml"))
    assert code == 0 and "rank --group-by: retrains the groups whose estimate is untrusted" in out
    code, out, _ = run(capsys, "check", "-c", str(small / "config.yaml"), "--json", "--set", "rank.group_retrain=false")
    assert "group_retrain" not in json.loads(out)


def test_group_retrains_run_with_one_thread_for_a_small_model(capsys, small, tmp_path, monkeypatch):
    """verify's rule (commands.verify.retrain_threads): small models retrain on one torch thread, restored after."""
    import torch

    from influence_cli.commands import rank_groups

    seen, real = [], rank_groups.retrain_groups

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(rank_groups, "retrain_groups", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _rank(capsys, small, tmp_path / "r", "rank.group_retrain=true")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
