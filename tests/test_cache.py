"""The cache's storage (checksums, atomic entries, pruning) and the solvers' stored state."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_case

from influence_cli import cache as cache_module
from influence_cli.cache import Cache, content_key
from influence_cli.config import SolverConfig
from influence_cli.models import save_checkpoint
from influence_cli.resume import shard_ranges
from influence_cli.solvers import SOLVERS
from influence_cli.solvers.base import Stateful


def test_round_trip_and_key_ignores_order(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    value = {"t": torch.arange(5.0), "info": {"a": [1, 2.5, "x", None]}, "none": None}
    cache.put("fit-x", value)
    got = cache.get("fit-x")
    assert torch.equal(got["t"], value["t"]) and got["info"] == value["info"] and got["none"] is None
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})
    assert cache.get("missing") is None
    assert cache.stats.hits == ["fit-x"] and cache.stats.writes == ["fit-x"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_write_finishes_the_entry_then_interrupts(tmp_path: Path, monkeypatch, signum: int) -> None:
    """torch.save writes through Python from C++: an interrupt raised in there came out as a
    RuntimeError (an 'internal error', exit 4, in CI). It must wait for the whole entry, then stop."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)  # what the CLI installs for SIGTERM
    try:
        write, sent = cache_module._Hashing.write, []

        def write_then_signal(self, data):
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signum)
            return write(self, data)
        monkeypatch.setattr(cache_module._Hashing, "write", write_then_signal)
        cache = Cache(tmp_path)
        value = {"t": torch.randn(50_000)}
        with pytest.raises(KeyboardInterrupt):
            cache.put("e", value)
        assert sent and torch.equal(Cache(tmp_path).get("e")["t"], value["t"])  # whole and valid
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert signal.getsignal(signal.SIGTERM) is interrupt  # handlers are back as they were
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interrupt_mid_checkpoint_write_keeps_the_whole_file(tmp_path: Path, monkeypatch) -> None:
    model = torch.nn.Linear(200, 100)
    real_save, sent = torch.save, []

    def save_then_signal(obj, f, *args, **kwargs):
        class Signalling:
            def write(self, data):
                if not sent:
                    sent.append(True)
                    os.kill(os.getpid(), signal.SIGINT)
                return f.write(data)

            def flush(self):
                f.flush()
        return real_save(obj, Signalling(), *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_then_signal)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "model.pt")
    monkeypatch.undo()
    assert sent and torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], model.weight.detach())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "trailer_only", "no_trailer"])
def test_damaged_entries_are_misses_and_removed(tmp_path: Path, damage: str) -> None:
    cache = Cache(tmp_path)
    cache.put("e", {"t": torch.randn(100)})
    path = tmp_path / "e.pt"
    blob = path.read_bytes()
    broken = {"truncate": blob[: len(blob) // 2], "flip": blob[:100] + bytes([blob[100] ^ 1]) + blob[101:],
              "empty": b"", "garbage": os.urandom(len(blob)), "trailer_only": blob[-76:],
              "no_trailer": blob[:-76]}[damage]
    path.write_bytes(broken)
    assert cache.get("e") is None
    assert cache.stats.corrupt == ["e"] and not path.exists()


def test_a_pickle_payload_with_a_valid_checksum_is_not_loaded(tmp_path: Path) -> None:
    """weights_only: an entry can hold data, never code."""
    import hashlib
    import io

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned",))

    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer)
    payload = buffer.getvalue()
    (tmp_path / "e.pt").write_bytes(payload + b"INFLCACHE1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n")
    assert Cache(tmp_path).get("e") is None


def test_disabled_cache_stores_nothing(tmp_path: Path) -> None:
    cache = Cache(None)
    cache.put("e", {"a": 1})
    assert cache.get("e") is None and not cache.enabled and cache.prune() == []


def test_prune_drops_least_recently_used_until_under_the_limit(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_bytes=None)
    for i, name in enumerate(["old", "mid", "new"]):
        cache.put(name, {"t": torch.zeros(25_000)})  # ~100 kB each
        os.utime(tmp_path / f"{name}.pt", (time.time() - 100 + i, time.time() - 100 + i))
    cache.put("shards/shard-00000", {"t": torch.zeros(25_000)})  # a shard folder counts as one entry
    cache.get("old")  # touched: now the most recent
    stale = tmp_path / ".x.pt.123.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    size = (tmp_path / "old.pt").stat().st_size
    cache.max_bytes = 2 * size + 10
    removed = cache.prune()
    assert removed == ["mid", "new"]
    assert (tmp_path / "old.pt").exists() and (tmp_path / "shards").exists() and not stale.exists()


def test_shard_ranges_align_with_batches() -> None:
    ranges = shard_ranges(1000, 300, 128)  # rounded up to 384 rows
    assert [(r.start, r.stop) for r in ranges] == [(0, 384), (384, 768), (768, 1000)]
    assert shard_ranges(10, 8192, 256) == [range(0, 10)]


STATEFUL = [name for name, cls in SOLVERS.items() if issubclass(cls, Stateful)]


@pytest.mark.parametrize(("name", "damping"), [(name, 1e-3) for name in STATEFUL] + [("direct", 0.0)])
def test_stored_state_restores_the_same_solver(tmp_path: Path, name: str, damping: float) -> None:
    """damping 0 on the exact, indefinite Hessian of an untrained MLP: direct's eigen form."""
    case = make_case("mlp", n=30, d=3, classes=3, damping=damping, hessian="gauss_newton" if damping > 0 else "exact")
    problem = case.problem
    config = replace(SolverConfig(name=name, damping=damping), arnoldi=replace(SolverConfig().arnoldi, rank=8))
    fitted = SOLVERS[name](config).fit(problem)
    Cache(tmp_path).put("s", fitted.state())
    restored = SOLVERS[name](config).load_state(Cache(tmp_path).get("s"), problem)
    v = torch.randn(4, problem.params.size, dtype=torch.float64)
    assert torch.equal(restored.ihvp(v), fitted.ihvp(v))
    if hasattr(fitted, "half_ihvp"):
        assert torch.equal(restored.half_ihvp(v), fitted.half_ihvp(v))
    assert restored.describe() == fitted.describe()
    if name == "direct" and damping == 0:
        assert fitted.describe()["factorization"] == "eigen"
