"""The CUDA path (`gpu`-marked, skipped without CUDA; benchmarks/gpu_check.sh runs them): selfcheck and rank on
cuda equal the CPU's in float32 (same ranking, values within 1e-4 relative), and torchrun on NCCL (two GPUs)
equals one process."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from test_distributed import _config, assert_same_table, data, torchrun  # noqa: F401 - the fixture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
RTOL_FLOAT32 = 1e-4


def _close(one: pd.DataFrame, two: pd.DataFrame, column: str) -> None:
    a, b = one[column].to_numpy(float), two[column].to_numpy(float)
    scale = max(float(np.abs(a).max()), 1e-300)
    np.testing.assert_allclose(b, a, rtol=RTOL_FLOAT32, atol=1e-6 * scale, err_msg=column)


@pytest.mark.parametrize(("command", "solver", "model", "file", "column"),
                         [("selfcheck", "ekfac", "mlp", "selfcheck.csv", "self_influence"),
                          ("selfcheck", "direct", "logreg", "selfcheck.csv", "self_influence"),
                          ("rank", "ekfac", "mlp", "overall.csv", "loss_change_if_removed"),
                          ("rank", "direct", "logreg", "overall.csv", "loss_change_if_removed")])
def test_cuda_equals_cpu_in_float32(capsys, data, tmp_path, command, solver, model, file, column):  # noqa: F811
    cfg = _config(data, tmp_path, solver, model)
    frames = {}
    for device in ("cpu", "cuda"):
        code, _, err = run_cli(capsys, command, "-c", cfg, "-o", str(tmp_path / device), "--no-cache", "--quiet",
                               "--set", f"device={device}", "--set", "dtype=float32")
        assert code == 0, err
        frames[device] = pd.read_csv(tmp_path / device / file, keep_default_na=False)
        manifest = json.loads((tmp_path / device / "manifest.json").read_text())
        assert manifest["device"].startswith(device)
    cpu, cuda = frames["cpu"], frames["cuda"]
    by_id = cuda.set_index("id").loc[cpu["id"]].reset_index()
    _close(cpu, by_id, column)
    top = max(1, len(cpu) // 20)  # the same top 5% (ties within float32 may swap neighbours, not membership)
    assert set(cpu["id"][:top]) == set(cuda["id"][:top])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_two_ranks_on_nccl_equal_one_process(capsys, data, tmp_path):  # noqa: F811
    cfg = _config(data, tmp_path, "ekfac", "mlp")
    code, _, err = run_cli(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path / "one"), "--no-cache", "--quiet",
                           "--set", "device=cuda:0")
    assert code == 0, err
    done = torchrun("selfcheck", "-c", cfg, "-o", str(tmp_path / "two"), "--quiet", "--set", "device=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["distributed"]["backend"] == "nccl" and manifest["device"] == "cuda:0"
    one = pd.read_csv(tmp_path / "one" / "selfcheck.csv", keep_default_na=False)
    two = pd.read_csv(tmp_path / "two" / "selfcheck.csv", keep_default_na=False)
    _close(one, two.set_index("id").loc[one["id"]].reset_index(), "self_influence")
