"""A content-keyed cache on disk: fitted curvature and finished shards of per-row results.

An entry's name carries the sha256 of everything its value depends on (checkpoint bytes, dataset
fingerprints, the settings that change the numbers, package and torch versions), so a changed
input simply misses and nothing is ever invalidated by hand. Layout under `cache.dir`:
`<kind>-<key>.pt` for one value, `<kind>-<key>/<part>.pt` for the shards of one sharded pass.

Each file is a `torch.save` payload followed by `INFLCACHE1 <sha256 of the payload>\n`, streamed
to a temp file (hashed as it is written) and renamed into place (no fsync, see `put`): a killed
run leaves whole entries only, and an entry whose checksum does not match (truncated, edited, a
bad disk, a power cut) is deleted and recomputed, never trusted. Payloads load with `weights_only=True`, so an entry cannot run code.

The cache is an optimisation and never a reason to fail a run: a folder that cannot be written
turns it off with a warning. After each run the least recently used entries go when the folder
is over `cache.max_gb`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import write_atomic_bytes
from .interrupts import deferred

MAGIC = b"INFLCACHE1 "
TRAILER = len(MAGIC) + 64 + 1  # after the torch.save payload: magic, sha256 hex of the payload, newline
CHUNK = 16 * 2**20
FORMAT = 1  # bump when an entry's layout or meaning changes
STALE_TEMP_SECONDS = 3600


def content_key(parts: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able mapping (key order does not matter), 24 hex digits."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class CacheStats:
    hits: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Cache:
    """Entries under `root` (None: a cache that stores nothing and finds nothing)."""

    def __init__(self, root: Path | None, max_bytes: int | None = None) -> None:
        self.root, self.max_bytes = root, max_bytes
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def get(self, name: str) -> dict[str, Any] | None:
        """The stored value, or None when absent or corrupt (a corrupt file is removed)."""
        if self.root is None:
            return None
        path = self.root / f"{name}.pt"
        try:
            value = _read(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._off(f"cannot read {path} ({e.strerror})")
            return None
        if value is None:
            self.stats.corrupt.append(name)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # least recently used goes first when pruning
        except OSError:
            pass
        self.stats.hits.append(name)
        return value

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock on one entry across processes (an flock on .locks/<name>.lock): whoever
        holds it computes the entry, the others wait and then read it. A no-op without a folder."""
        if self.root is None:
            yield
            return
        path = self.root / ".locks" / f"{name}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            self._off(f"cannot lock {path} ({e.strerror})")
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def has(self, name: str) -> bool:
        """Whether an entry (or shard folder) of that name exists; its checksum is checked on `get`."""
        return self.root is not None and ((self.root / f"{name}.pt").is_file() or (self.root / name).is_dir())

    def put(self, name: str, value: Mapping[str, Any]) -> None:
        """Store `value` (tensors, numbers, strings, lists and dicts of them) atomically."""
        if self.root is None:
            return
        path = self.root / f"{name}.pt"

        def write(f: Any) -> None:
            sink = _Hashing(f)  # streamed: a gigabyte Hessian factor is never copied in memory
            torch.save(dict(value), sink)
            f.write(MAGIC + sink.digest.hexdigest().encode() + b"\n")

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # no fsync: a kill never loses written data, and what a power cut could (a short or
            # zeroed file under the final name) fails the checksum and is recomputed
            write_atomic_bytes(path, write, fsync=False)
        except OSError as e:
            self._off(f"cannot write {path} ({e.strerror})")
            return
        self.stats.writes.append(name)

    def cached(self, name: str, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """(value, reused): the stored value, or compute() stored now."""
        value = self.get(name)
        if value is not None:
            return value, True
        value = compute()
        self.put(name, value)
        return value, False

    def prune(self) -> list[str]:
        """Drop stale temp files, then least recently used entries until under max_bytes. Returns
        the names removed."""
        if self.root is None or not self.root.is_dir():
            return []
        removed, entries, now = [], [], time.time()
        for item in self.root.iterdir():
            if item.name == ".locks":  # empty lock files, held by running jobs
                continue
            try:
                if item.name.endswith(".tmp"):
                    if now - item.stat().st_mtime > STALE_TEMP_SECONDS:
                        item.unlink(missing_ok=True)
                    continue
                files = list(_files(item))
                size = sum(f.stat().st_size for f in files)
                used = max((f.stat().st_mtime for f in files), default=item.stat().st_mtime)
                entries.append((used, size, item))
            except OSError:
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, item in sorted(entries, key=lambda e: e[0]):
            if self.max_bytes is None or total <= self.max_bytes:
                break
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
            total -= size
            removed.append(item.name.removesuffix(".pt"))
        return removed

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {"dir": str(self.root) if self.root else None, "enabled": self.enabled, "entries_reused": len(s.hits),
                "entries_stored": len(s.writes), "corrupt_recomputed": list(s.corrupt)}

    def _off(self, why: str) -> None:
        self.stats.warnings.append(f"cache: {why}; running without the cache (set cache.dir to a writable folder)")
        self.root = None


class _Hashing:
    """A write-only file that hashes what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _read(path: Path) -> dict[str, Any] | None:
    """The entry's value, or None when its trailer or checksum is wrong or it does not load."""
    size = path.stat().st_size
    if size < TRAILER:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size - TRAILER
        while left > 0:
            chunk = f.read(min(left, CHUNK))
            if not chunk:
                return None
            digest.update(chunk)
            left -= len(chunk)
        trailer = f.read(TRAILER)
    if trailer != MAGIC + digest.hexdigest().encode() + b"\n":
        return None
    try:  # the trailer after the zip's end is ignored by torch's reader
        with deferred():  # an interrupt inside torch's reader must not make a good entry look corrupt
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable payload is a miss
        return None
    return value if isinstance(value, dict) else None


def _files(item: Path) -> Iterator[Path]:
    if item.is_dir():
        yield from (f for f in item.rglob("*") if f.is_file())
    else:
        yield item
