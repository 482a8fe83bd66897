"""Caching and resuming through the real CLI: killed runs resume byte-identically, SIGTERM exits 130
keeping finished shards, changed inputs miss, corrupt entries are recomputed, the cache never
fails a run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from influence_cli import cli
from influence_cli.cache import Cache
from influence_cli.config import ModelConfig
from influence_cli.models import build_model, save_checkpoint

INFL = [sys.executable, "-c", "from influence_cli.cli import main; main()"]


def _workload(folder: Path, n: int, d: int = 24, classes: int = 5, seed: int = 0, shard_rows: int = 2048) -> Path:
    """A logistic regression on n synthetic rows (tensors format), its checkpoint and config."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes] + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    torch.save({"x": x, "y": y}, folder / "train.pt")
    model_cfg = ModelConfig(arch="logreg", kwargs={"in_features": d, "num_classes": classes},
                            checkpoint=folder / "model.pt")
    torch.manual_seed(seed)
    save_checkpoint(build_model(model_cfg), folder / "model.pt")
    cfg = {"model": {"arch": "logreg", "kwargs": {"in_features": d, "num_classes": classes}, "checkpoint": "model.pt"},
           "data": {"train": {"format": "tensors", "path": "train.pt"}},
           "batch_size": 512, "device": "cpu", "cache": {"shard_rows": shard_rows}, "output": {"dir": "reports"}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _infl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A real `infl` process (signals, resuming after a kill)."""
    return subprocess.run([*INFL, *args], capture_output=True, text=True, timeout=timeout)


def _json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    """`infl ... --json` in this process (faster: no torch import per run); asserts exit 0."""
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--json"])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    return json.loads(out.out)


def _shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("selfcheck-*/shard-*.pt"))


def _start_and_wait_for_shards(config: Path, out: Path, count: int) -> subprocess.Popen:
    proc = subprocess.Popen([*INFL, "selfcheck", "-c", str(config), "-o", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_shards(out / ".infl-cache")) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {count} shards before the run ended: rc {proc.returncode}, {proc.communicate()[1]}")
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, float]:
    """(config, the uninterrupted run's selfcheck.csv bytes, its wall time) for 60k rows (59 shards)."""
    folder = tmp_path_factory.mktemp("big")
    config = _workload(folder, 60_000, shard_rows=1024)
    start = time.perf_counter()
    done = _infl("selfcheck", "-c", str(config), "-o", str(folder / "reference"), "--no-cache", "--quiet")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert not (folder / "reference" / ".infl-cache").exists()  # --no-cache writes nothing
    return config, (folder / "reference" / "selfcheck.csv").read_bytes(), elapsed


def test_sigkill_mid_run_then_rerun_resumes_byte_identical(big: tuple[Path, bytes, float], tmp_path: Path) -> None:
    config, reference, cold_seconds = big
    out = tmp_path / "run"
    proc = _start_and_wait_for_shards(config, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    finished = len(_shards(out / ".infl-cache"))
    assert not (out / "selfcheck.csv").exists()  # nothing half-written, no report from the killed run
    start = time.perf_counter()
    rerun = _infl("selfcheck", "-c", str(config), "-o", str(out), "--json")
    resumed_seconds = time.perf_counter() - start
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "selfcheck.csv").read_bytes() == reference
    cache = json.loads(rerun.stdout)["cache"]
    assert cache["fit_reused"] is True  # the fit was committed before the first shard
    assert cache["shards_reused"] >= min(finished, 3) and cache["shards_reused"] < cache["shards"]
    print(f"cold {cold_seconds:.2f} s, resumed after SIGKILL with {cache['shards_reused']}/{cache['shards']} shards"
          f" done: {resumed_seconds:.2f} s")


def test_sigterm_exits_130_keeping_finished_shards(big: tuple[Path, bytes, float], tmp_path: Path) -> None:
    config, reference, _ = big
    out = tmp_path / "run"
    out.mkdir()
    (out / "selfcheck.csv").write_text("yesterday's report\n")
    proc = _start_and_wait_for_shards(config, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.startswith("error: interrupted") and "Traceback" not in err
    kept = _shards(out / ".infl-cache")
    assert len(kept) >= 2
    assert (out / "selfcheck.csv").read_text() == "yesterday's report\n"  # the previous report is untouched
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rerun = _infl("selfcheck", "-c", str(config), "-o", str(out), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["cache"]["shards_reused"] >= len(kept)
    assert (out / "selfcheck.csv").read_bytes() == reference


def test_cached_rerun_reuses_everything_and_changed_inputs_miss(tmp_path: Path, capsys) -> None:
    config = _workload(tmp_path, 6000)
    out = tmp_path / "out"

    def run(*extra: str) -> dict:
        return _json(capsys, "selfcheck", "-c", str(config), "-o", str(out), *extra)

    cold = run()["cache"]
    assert (cold["fit_reused"], cold["shards_reused"], cold["shards"]) == (False, 0, 3)
    first = (out / "selfcheck.csv").read_bytes()
    warm = run()["cache"]
    assert (warm["fit_reused"], warm["shards_reused"]) == (True, 3)
    assert (out / "selfcheck.csv").read_bytes() == first
    # flagging is applied after the cached pass: a new threshold reuses everything and changes the flags
    flags = run("--set", "selfcheck.flag_fraction=0.5")
    assert flags["cache"]["shards_reused"] == 3 and flags["flagged"] == 3000
    # what the numbers depend on misses: damping, weight decay, the data, the checkpoint
    assert run("--set", "solver.damping=0.01")["cache"]["fit_reused"] is False
    assert run("--set", "weight_decay=0.01")["cache"]["shards_reused"] == 0
    data = torch.load(tmp_path / "train.pt")
    data["x"][5, 0] += 1.0
    torch.save(data, tmp_path / "train.pt")
    changed = run()["cache"]
    assert (changed["fit_reused"], changed["shards_reused"]) == (False, 0)
    state = torch.load(tmp_path / "model.pt")
    next(iter(state.values())).add_(0.01)
    torch.save(state, tmp_path / "model.pt")
    assert run()["cache"]["fit_reused"] is False


def test_a_stored_factor_too_large_for_the_memory_limit_is_refused_before_it_is_read(tmp_path: Path, capsys,
                                                                                       monkeypatch) -> None:
    config = _workload(tmp_path, 3000)
    out = tmp_path / "out"
    assert _json(capsys, "selfcheck", "-c", str(config), "-o", str(out))["cache"]["fit_reused"] is False
    read = []
    monkeypatch.setattr(Cache, "get", lambda self, name: read.append(name))
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", str(config), "-o", str(out), "--set", "solver.memory_limit_gb=0.0001"])
    assert exc.value.code == 2 and "memory_limit_gb" in capsys.readouterr().err
    assert read == []  # the cached factor was never loaded


def test_corrupt_truncated_and_foreign_entries_are_recomputed(tmp_path: Path, capsys) -> None:
    config = _workload(tmp_path, 5000)
    out = tmp_path / "out"
    _json(capsys, "selfcheck", "-c", str(config), "-o", str(out))
    reference = (out / "selfcheck.csv").read_bytes()
    cache = out / ".infl-cache"
    shards = _shards(cache)
    fit = next(cache.glob("fit-*.pt"))
    shards[0].write_bytes(shards[0].read_bytes()[:200])  # truncated
    blob = bytearray(shards[1].read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the payload
    shards[1].write_bytes(bytes(blob))
    fit.write_bytes(b"not a cache entry at all")
    summary = _json(capsys, "selfcheck", "-c", str(config), "-o", str(out))
    assert len(summary["cache"]["corrupt_recomputed"]) == 3
    assert summary["cache"]["fit_reused"] is False and summary["cache"]["shards_reused"] == 1
    assert any("corrupt" in w for w in summary["warnings"])
    assert (out / "selfcheck.csv").read_bytes() == reference
    again = _json(capsys, "selfcheck", "-c", str(config), "-o", str(out))
    assert again["cache"]["corrupt_recomputed"] == [] and again["cache"]["shards_reused"] == 3


def test_unwritable_cache_warns_and_the_run_still_succeeds(tmp_path: Path, capsys) -> None:
    config = _workload(tmp_path, 3000)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    summary = _json(capsys, "selfcheck", "-c", str(config), "-o", str(tmp_path / "out"),
                    "--set", f"cache.dir={blocker / 'cache'}")
    assert summary["cache"]["enabled"] is False
    assert any(w.startswith("cache: cannot") for w in summary["warnings"])
    assert (tmp_path / "out" / "selfcheck.csv").exists()


def test_rank_reuses_fit_and_shards_and_matches_an_uncached_run(tmp_path: Path, capsys) -> None:
    config = _workload(tmp_path, 5000)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 24, generator=g)
    torch.save({"x": x, "y": x[:, :5].argmax(1)}, tmp_path / "test.pt")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["test"] = {"format": "tensors", "path": "test.pt"}
    config.write_text(yaml.safe_dump(raw))
    out, plain = tmp_path / "out", tmp_path / "plain"

    def rank(folder: Path, *extra: str) -> dict:
        return _json(capsys, "rank", "-c", str(config), "-o", str(folder), *extra)

    cold = rank(out)["cache"]
    assert (cold["fit_reused"], cold["shards_reused"], cold["shards"]) == (False, 0, 3)
    warm = rank(out)["cache"]
    assert (warm["fit_reused"], warm["shards_reused"]) == (True, 3)
    rank(plain, "--no-cache")
    for name in ("helpful.csv", "harmful.csv", "overall.csv"):
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    other = rank(out, "--test-ids", "2,5")["cache"]  # other test rows: the same fit, new shards
    assert (other["fit_reused"], other["shards_reused"]) == (True, 0)
    rank(plain, "--no-cache", "--test-ids", "2,5")
    assert (out / "helpful.csv").read_bytes() == (plain / "helpful.csv").read_bytes()


def test_check_says_whether_the_fit_is_cached(tmp_path: Path, capsys) -> None:
    config = _workload(tmp_path, 2000)
    out = str(tmp_path / "out")
    assert _json(capsys, "check", "-c", str(config), "-o", out)["cache"]["fit_cached"] is False
    _json(capsys, "selfcheck", "-c", str(config), "-o", out)
    assert _json(capsys, "check", "-c", str(config), "-o", out)["cache"]["fit_cached"] is True
    assert _json(capsys, "check", "-c", str(config), "-o", out, "--set", "solver.damping=0.5")["cache"][
        "fit_cached"] is False
