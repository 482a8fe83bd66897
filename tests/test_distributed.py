"""torchrun: 2 ranks on gloo give a single process's reports; a dead rank stops the job, a rerun resumes.

Each test starts real processes (torchrun, or two ranks with torchrun's environment variables) on a
256-row slice of the digits data, and compares the CSVs with one in-process run: the same ids in the
same order, values within 1e-6 relative (the reduced curvature differs from one process's sum only in
the order of float64 additions).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
INFL = str(Path(sys.executable).parent / "infl")
RTOL = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    pd.read_csv(ROOT / "sample_data/digits/train.csv").head(256).to_csv(folder / "train.csv", index=False)
    pd.read_csv(ROOT / "sample_data/digits/test.csv").head(30).to_csv(folder / "test.csv", index=False)
    (folder / "logreg.pt").write_bytes((ROOT / "sample_data/digits/logreg.pt").read_bytes())
    import torch

    from influence_cli.models import ARCHS

    torch.manual_seed(0)  # a small 2-layer net (p = 610): the exact check's direct fit stays cheap
    torch.save(ARCHS["mlp"](in_features=64, hidden=[8], num_classes=10, activation="tanh").state_dict(),
               folder / "mlp.pt")
    return folder


def _config(data: Path, tmp: Path, solver: str, model: str = "logreg") -> str:
    arch = ("{arch: logreg, kwargs: {in_features: 64, num_classes: 10}, checkpoint: %s/logreg.pt}" if model == "logreg"
            else "{arch: mlp, kwargs: {in_features: 64, hidden: [8], num_classes: 10, activation: tanh},"
                 " checkpoint: %s/mlp.pt}") % data
    path = tmp / f"{solver}-{model}.yaml"
    path.write_text(
        f"model: {arch}\nbatch_size: 32\nweight_decay: 0.001\n"
        f"data:\n  train: {{format: csv, path: {data}/train.csv, label: label, id: id, carry: [source]}}\n"
        f"  test: {{format: csv, path: {data}/test.csv, label: label, id: id, carry: [source]}}\n"
        f"solver: {{name: {solver}, cg: {{max_iter: 30, tol: 1.0e-8}}}}\ncache: {{shard_rows: 64}}\n")
    return str(path)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "INFL_FAULT")}
    return {**env, "OMP_NUM_THREADS": "1", "INFL_DIST_TIMEOUT": "120", **extra}


def torchrun(*argv: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           INFL, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=600, check=False)


def assert_same_table(single: Path, split: Path) -> None:
    a, b = pd.read_csv(single, keep_default_na=False), pd.read_csv(split, keep_default_na=False)
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if a[column].dtype.kind == "f":
            np.testing.assert_allclose(b[column].to_numpy(), a[column].to_numpy(), rtol=RTOL, atol=0, err_msg=column)
        else:
            assert a[column].astype(str).tolist() == b[column].astype(str).tolist(), f"{split.name}: {column}"


CASES = [("selfcheck", "ekfac", "mlp", ["selfcheck.csv", "classes.csv"]),
         ("selfcheck", "direct", "logreg", ["selfcheck.csv", "classes.csv"]),
         ("selfcheck", "cg", "logreg", ["selfcheck.csv"]),
         ("rank", "direct", "logreg", ["overall.csv", "helpful.csv", "harmful.csv"]),
         ("rank", "cg", "logreg", ["overall.csv", "helpful.csv", "harmful.csv"])]


@pytest.mark.parametrize(("command", "solver", "model", "files"), CASES, ids=[f"{c}-{s}" for c, s, _, _ in CASES])
def test_two_ranks_equal_one_process(capsys, data, tmp_path, command, solver, model, files):
    cfg = _config(data, tmp_path, solver, model)
    extra = ["--test-ids", "d0022,d0103,d0160"] if command == "rank" else []
    code, _, err = run_cli(capsys, command, "-c", cfg, "-o", str(tmp_path / "one"), "--no-cache", "--quiet", *extra)
    assert code == 0, err
    done = torchrun(command, "-c", cfg, "-o", str(tmp_path / "two"), "--json", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0's document, alone on stdout: the other rank printed nothing
    assert summary["command"] == command
    for name in files:
        assert_same_table(tmp_path / "one" / name, tmp_path / "two" / name)
        if solver == "cg":  # nothing reduced: cg has no fit, its solves run inside the scoring pass, alone
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    block = manifest["distributed"]
    assert block["world_size"] == 2 and block["backend"] == "gloo"
    assert block["rows_per_rank"] == [128, 128] and block["row_ranges"] == [[0, 128], [128, 256]]
    assert "error:" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(argv: list[str], **env: str) -> list[subprocess.CompletedProcess]:
    """Two ranks started as torchrun starts them (its environment variables), without its agent, so that
    each rank's own exit code is seen."""
    port = str(_free_port())
    procs = [subprocess.Popen([INFL, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, **env)) for r in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_a_dead_rank_ends_the_job_with_exit_4_and_a_rerun_resumes(capsys, data, tmp_path):
    cfg = _config(data, tmp_path, "direct")
    argv = ["selfcheck", "-c", cfg, "-o", str(tmp_path / "two"), "--quiet"]
    zero, one = _ranks(argv, INFL_FAULT="rank=1,after_shards=1")  # rank 1 is SIGKILLed after its first shard
    assert one.returncode == -9
    assert zero.returncode == 4, zero.stderr
    assert zero.stderr.startswith("error: torchrun:") and "rerun the same command to resume" in zero.stderr
    assert not (tmp_path / "two" / "selfcheck.csv").exists()
    shards = sorted((tmp_path / "two" / ".infl-cache").rglob("shard-*"))
    assert len(shards) == 3, shards  # rank 0's two and rank 1's first are kept
    code, _, err = run_cli(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path / "one"), "--no-cache", "--quiet")
    assert code == 0, err
    again = torchrun("selfcheck", "-c", cfg, "-o", str(tmp_path / "two"), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    cache = json.loads(again.stdout)["cache"]
    assert cache["fit_reused"] and cache["shards"] == 4 and cache["shards_reused"] == 3
    assert_same_table(tmp_path / "one" / "selfcheck.csv", tmp_path / "two" / "selfcheck.csv")


def test_check_and_train_run_on_rank_0_only(data, tmp_path):
    cfg = _config(data, tmp_path, "direct")
    done = torchrun("check", "-c", cfg, "-o", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "infl check: runs on rank 0 only under torchrun; rank 1 of 2 exits" in done.stderr
    assert done.stdout.count("parameters") >= 1  # rank 0's check lines


def test_torchrun_needs_the_cache_and_refuses_shard_options(data, tmp_path):
    cfg = _config(data, tmp_path, "direct")
    zero, one = _ranks(["selfcheck", "-c", cfg, "-o", str(tmp_path / "r"), "--no-cache"])
    assert zero.returncode == one.returncode == 2
    assert zero.stderr.startswith("error: torchrun: infl selfcheck needs the cache")
    zero, one = _ranks(["selfcheck", "-c", cfg, "-o", str(tmp_path / "r"), "--shard", "0/2"])
    assert zero.returncode == one.returncode == 2
    assert zero.stderr.startswith("error: --shard: not under torchrun")


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_two_ranks_retrain_groups_on_rank_zero_alone(capsys, data, tmp_path, solver):
    """rank --group-by with rank.group_retrain: true: the ranks split the scoring, then rank 0 retrains each group
    alone (the others have left): groups.csv equals one process's."""
    cfg = _config(data, tmp_path, solver)
    extra = ["--test-ids", "d0022,d0103,d0160", "--group-by", "source", "--set", "rank.group_retrain=true"]
    code, _, err = run_cli(capsys, "rank", "-c", cfg, "-o", str(tmp_path / "one"), "--no-cache", "--quiet", *extra)
    assert code == 0, err
    done = torchrun("rank", "-c", cfg, "-o", str(tmp_path / "two"), "--json", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout)["group_retrain"]["retrained"]) == 4
    assert_same_table(tmp_path / "one" / "groups.csv", tmp_path / "two" / "groups.csv")


def test_two_ranks_cross_fit_a_memorizing_model_as_one_process(capsys, data, tmp_path):
    """selfcheck.cross_fit: auto on a model that fits every training label (64 features, 256 rows, almost no weight
    decay): the ranks decide from the checkpoint's loss summed over their rows, take rank 0's decision (each times
    its own estimate), train the five fold models between them (folds 0, 2, 4 and 1, 3), and write one process's
    report."""
    cfg = Path(_config(data, tmp_path, "direct"))
    cfg.write_text(cfg.read_text().replace("weight_decay: 0.001", "weight_decay: 1.0e-5")
                   .replace(f"checkpoint: {data}/logreg.pt", f"checkpoint: {tmp_path}/fits.pt")
                   + "train: {epochs: 200}\n")
    code, _, err = run_cli(capsys, "train", "-c", str(cfg), "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "selfcheck", "-c", str(cfg), "-o", str(tmp_path / "one"), "--no-cache", "--json")
    assert code == 0, err
    assert json.loads(out)["cross_fit"]["folds"] == 5  # memorized, and within the budget: cross-fitted
    done = torchrun("selfcheck", "-c", str(cfg), "-o", str(tmp_path / "two"), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["cross_fit"]["folds"] == 5
    assert json.loads(done.stdout)["cross_fit"]["ranks"] == 2  # decided and trained with both ranks in the group
    for name in ("selfcheck.csv", "classes.csv"):
        assert_same_table(tmp_path / "one" / name, tmp_path / "two" / name)
