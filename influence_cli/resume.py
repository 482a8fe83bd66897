"""How a command's work is keyed, cached and resumed (the storage itself is cache.py).

Keys: `base_key` holds what every cached value depends on (checkpoint sha256, training data
fingerprint, model and objective settings, dtype, device type, seed, batch size, versions);
`solver_key` adds the solver's settings. Values computed from them:
- the fitted solver (`fit_solver`): Hessian factor, eigenbasis, EK-FAC factors, LiSSA's scale;
- shards (`shards`): per-row results of a streamed pass over rows [k R, (k+1) R), R a multiple of
  the batch size, so a shard sees exactly the batches an uninterrupted run sees there. A shard is
  committed when it finishes; a rerun skips finished shards without reading their rows, and
  computes the missing ones the same way, so its CSVs are byte-identical to an uninterrupted run.
- under torchrun (`split_shards`): rank r computes the shards of job r of WORLD_SIZE (`job_of`), the
  ranks meet at a barrier, and rank 0 alone reads every shard (the others exit); the curvature and the
  out-of-fold outputs (`shared`) are looked up by rank 0 (stored or not), computed by all ranks together, and
  stored by rank 0.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import distributed
from .cache import FORMAT, Cache, content_key
from .config import Config
from .errors import DataError
from .objective import Problem
from .solvers import MemoryChecked, Solver
from .solvers.base import Progress, Stateful


def open_cache(cfg: Config) -> Cache:
    """The configured cache; a stand-in that stores nothing when off or when no folder is set
    (the CLI sets cache.dir to <report folder>/.infl-cache unless the config names one)."""
    if not cfg.cache.enabled or cfg.cache.dir is None:
        return Cache(None)
    return Cache(Path(cfg.cache.dir), int(cfg.cache.max_gb * 2**30))


def base_key(cfg: Config, problem: Problem, checkpoint_sha256: str | None, train_fingerprint: str) -> dict[str, Any]:
    from . import report  # versions

    return {
        "format": FORMAT, "versions": {k: v for k, v in report.environment().items() if k in ("infl", "torch")},
        "checkpoint": checkpoint_sha256, "train": train_fingerprint,
        "arch": cfg.model.arch, "arch_source": _source_digest(cfg.model.arch), "kwargs": cfg.model.kwargs,
        "task": cfg.task, "weight_decay": cfg.weight_decay, "dtype": cfg.dtype, "device": problem.device.type,
        "seed": cfg.seed, "batch_size": cfg.batch_size,
        "params": [[name, list(shape)] for name, shape in zip(problem.params.names, problem.params.shapes, strict=True)],
    }


def solver_key(base: dict[str, Any], cfg: Config, solver_name: str) -> dict[str, Any]:
    settings = asdict(cfg.solver)
    settings["name"] = solver_name  # `auto` resolved
    settings.pop("memory_limit_gb", None)  # changes how, not what
    return {**base, "solver": settings}


def fit_name(solver_name: str, key: dict[str, Any]) -> str:
    return f"fit-{solver_name}-{content_key(key)}"


def fit_solver(cache: Cache, solver: Solver, problem: Problem, key: dict[str, Any],
               progress: Progress | None = None, fit_allowed: bool = True) -> tuple[Solver, bool]:
    """(fitted solver, reused): its stored curvature when the cache has it, else fit and store."""
    if not isinstance(solver, Stateful) or not cache.enabled:
        return solver.fit(problem, progress), False
    name = fit_name(solver.name, key)
    if isinstance(solver, MemoryChecked):
        solver.check_memory(problem)  # refuse before reading a stored factor that could not be used (direct's is p x p)
    if distributed.active():  # torchrun: rank 0 decides, every rank fits (the collectives need all) or reads
        state, reused = shared(cache, name, lambda: _fitted_state(solver, problem, progress), "the fitted curvature")
        return (solver.load_state(state, problem) if reused else solver), reused
    with cache.lock(name):  # concurrent jobs (--shard i/N): the first fits, the others wait and read it
        stored = cache.get(name)
        if stored is not None:
            if progress is not None:
                progress(1, 1)
            return solver.load_state(stored, problem), True
        if not fit_allowed:
            raise DataError("--merge: the cache holds no fitted curvature for these inputs",
                            hint="run the --shard i/N jobs first, with the same config and options")
        solver.fit(problem, progress)
        cache.put(name, solver.state())
    return solver, False


def _fitted_state(solver: Solver, problem: Problem, progress: Progress | None) -> dict[str, Any]:
    solver.fit(problem, progress)
    return solver.state()


def shared(cache: Cache, name: str, compute: Callable[[], dict[str, Any]], what: str) -> tuple[dict[str, Any], bool]:
    """(value, reused) as `cache.cached`, under torchrun: rank 0 looks the entry up (holding its lock) and its
    answer holds on every rank, so that either every rank reads the stored value or every rank runs `compute`,
    which may hold collectives and must give every rank the same value; rank 0 stores it. Without a live
    process group: cache.cached. `what` names the value in the error of a rank that cannot read what rank 0
    found (a cache.dir that is not shared)."""
    world = distributed.world()
    if world is None:
        return cache.cached(name, compute)
    with cache.lock(name) if world.rank == 0 else nullcontext():
        stored = cache.get(name) if world.rank == 0 else None
        if distributed.agree(stored is not None):
            stored = stored if stored is not None else cache.get(name)
            if stored is None:
                raise DataError(f"torchrun: rank {world.rank} cannot read {what} rank 0 found in cache.dir",
                                hint="give every rank the same (shared) cache.dir")
            return stored, True
        value = compute()
        if world.rank == 0:
            cache.put(name, value)
    return value, False


def shard_ranges(n: int, shard_rows: int, batch_size: int, ranks: int = 1) -> list[range]:
    """Shards of `shard_rows` rows rounded up to whole batches; with `ranks` > 1 (torchrun) no larger
    than floor(batches / ranks) batches, so that every rank holds at least one shard."""
    size = -(-max(shard_rows, 1) // batch_size) * batch_size
    if ranks > 1:
        size = min(size, batch_size * max(1, -(-n // batch_size) // ranks))
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def rank_rows(ranges: list[range], rank: int, ranks: int) -> range:
    """The contiguous training rows of torchrun rank `rank`: its block of shards (`job_of`)."""
    mine = [r for k, r in enumerate(ranges) if job_of(k, len(ranges), ranks) == rank]
    return range(mine[0].start, mine[-1].stop) if mine else range(0, 0)


def job_of(shard: int, shards: int, jobs: int) -> int:
    """The `--shard i/N` job that computes shard k of K: contiguous blocks of shards, job i has
    shards [i K / N, (i + 1) K / N)."""
    return shard * jobs // shards


def shards(cache: Cache, name: str, ranges: list[range], compute: Callable[[range, int], dict[str, Any]],
           progress: Progress | None = None, *, job: tuple[int, int] | None = None, merge: bool = False
           ) -> Iterator[tuple[range, dict[str, Any], bool]]:
    """(rows, value, reused) per shard, in order. compute(rows, done_before) runs only for shards the
    cache lacks; each is committed as soon as it finishes (what survives a kill).
    job=(i, N): only job i's shards (job_of), the others are not yielded. merge: compute nothing;
    DataError naming the jobs whose shards are missing."""
    total = ranges[-1].stop if ranges else 0
    parts = [f"{name}/shard-{k:05d}-of-{len(ranges):05d}" for k in range(len(ranges))]
    if merge:
        missing = [k for k, part in enumerate(parts) if not cache.has(part)]
        if missing:
            rows = ", ".join(f"{ranges[k].start}-{ranges[k].stop - 1}" for k in missing[:5])
            raise DataError(f"--merge: {len(missing)} of {len(ranges)} shards are not in the cache (rows {rows})",
                            hint="rerun the --shard jobs that did not finish, with the same config and options;"
                                 " for --shard i/N with N jobs the missing shards are "
                                 + ", ".join(f"{k} of {len(ranges)}" for k in missing[:5]))
    for k, rows in enumerate(ranges):
        if job is not None and job_of(k, len(ranges), job[1]) != job[0]:
            continue
        part = parts[k]
        value = cache.get(part)
        reused = value is not None
        if value is None:
            value = compute(rows, rows.start)
            cache.put(part, value)
        if progress is not None:
            progress(rows.stop, total)
        yield rows, value, reused


def split_shards(cache: Cache, name: str, ranges: list[range], compute: Callable[[range, int], dict[str, Any]],
                 progress: Progress | None = None) -> Iterator[tuple[range, dict[str, Any], bool]]:
    """torchrun's `shards`: this rank computes and commits its own missing shards, the ranks meet, then the
    ranks other than 0 exit (distributed.RankDone) and rank 0 yields every shard from the cache, computing
    none (reused = no rank computed it this run). The shards are computed `distributed.alone()`: solves
    inside them (cg's and lissa's per-row self-influence, rank's test-side solve) use full-data HVPs on this
    rank, identical on every rank, so the scoring needs no collective until the barrier."""
    import torch

    world = distributed.world()
    if world is None:  # callers reach here only under torchrun
        raise RuntimeError("internal: split_shards outside a torchrun process group")
    computed = torch.zeros(len(ranges), dtype=torch.float64)
    index = {r.start: k for k, r in enumerate(ranges)}
    with distributed.alone():
        for rows, _, reused in shards(cache, name, ranges, compute, None, job=(world.rank, world.size)):
            if not reused:
                computed[index[rows.start]] = 1.0
                distributed.fault_hook(world.rank, int(computed.sum()))
    distributed.all_sum(computed)  # the barrier: every rank's shards are committed
    parts = [f"{name}/shard-{k:05d}-of-{len(ranges):05d}" for k in range(len(ranges))]
    missing = [k for k, part in enumerate(parts) if not cache.has(part)]
    if world.rank == 0 and missing:
        raise DataError(f"torchrun: rank 0 does not see {len(missing)} of {len(ranges)} shards the other ranks"
                        " committed", hint="give every rank the same cache.dir on a shared filesystem")
    distributed.leave()  # ranks other than 0 exit here
    for rows, value, _ in shards(cache, name, ranges, compute, progress, merge=True):
        yield rows, value, not bool(computed[index[rows.start]])


def _source_digest(arch: str) -> str | None:
    """sha256 of a `package.module:factory` model's source file (editing it changes the key)."""
    if ":" not in arch:
        return None
    try:
        spec = importlib.util.find_spec(arch.partition(":")[0])
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    if not origin or not Path(origin).is_file():
        return None
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()


