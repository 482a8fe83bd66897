"""--shard i/N then --merge (no rendezvous: the jobs meet in the cache) gives the single run's reports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_cli as run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cfg(tmp_path) -> str:
    shutil.copytree(ROOT / "sample_data" / "digits", tmp_path / "data")
    (tmp_path / "c.yaml").write_text(
        "model: {arch: logreg, kwargs: {in_features: 64, num_classes: 10}, checkpoint: data/logreg.pt}\n"
        "data:\n  train: {format: csv, path: data/train.csv, label: label, id: id, carry: [source]}\n"
        "  test: {format: csv, path: data/test.csv, label: label, id: id}\n"
        "weight_decay: 0.001\ncache: {shard_rows: 256}\n")  # 6 shards of the 1,437 rows
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize(("command", "files"), [("selfcheck", ["selfcheck.csv", "classes.csv"]),
                                                ("rank", ["overall.csv", "helpful.csv", "harmful.csv"])])
def test_shards_then_merge_equal_one_run(capsys, cfg, tmp_path, command, files):
    extra = ["--test-ids", "d0022,d1705"] if command == "rank" else []
    assert run(capsys, command, "-c", cfg, "-o", str(tmp_path / "single"), "--no-cache", "--quiet", *extra)[0] == 0
    out = str(tmp_path / "sharded")
    for i in range(3):
        code, text, err = run(capsys, command, "-c", cfg, "-o", out, "--shard", f"{i}/3", *extra)
        assert code == 0, err
        assert f"shard {i}/3: 2 of 6 cache shards" in text
    assert not (tmp_path / "sharded" / files[0]).exists()  # the jobs write no report
    code, _, err = run(capsys, command, "-c", cfg, "-o", out, "--merge", "--quiet", *extra)
    assert code == 0, err
    for name in files:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def test_merge_names_the_missing_shards_and_computes_nothing(capsys, cfg, tmp_path):
    out = str(tmp_path / "r")
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", out, "--merge")
    assert code == 3 and "no fitted curvature" in err and "--shard" in err
    assert run(capsys, "selfcheck", "-c", cfg, "-o", out, "--shard", "0/3", "--quiet")[0] == 0
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", out, "--merge")
    assert code == 3 and "4 of 6 shards are not in the cache" in err and "rows 512-767" in err
    assert not (tmp_path / "r" / "selfcheck.csv").exists()


@pytest.mark.parametrize("bad", [["--shard", "3/3"], ["--shard", "x"], ["--shard", "0/2", "--merge"],
                                 ["--shard", "0/2", "--no-cache"]])
def test_bad_shard_options_are_usage_errors(capsys, cfg, tmp_path, bad):
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path / "r"), *bad)
    assert code == 2 and err.startswith("error: ")
