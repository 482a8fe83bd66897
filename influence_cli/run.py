"""One run of a command: its loaded inputs, timer, cache, fitted solver, resumable shards, and finish.

Every command (commands/*.py) opens a `Run`, asks it for the fitted solver (`run.fit()`, from the
cache when it has one), streams rows through `run.shards(...)` (each finished shard is committed to
the cache, so an interrupted run resumes), and ends with `run.finish(summary, tables)`, which adds
the trust figures and the manifest and returns a `Report` for the CLI to write and render.

`solver.damping` has one source of truth: the run's `damping` (initially `cfg.solver.damping`). The
solver's settings, `Problem.damping` (what the math reads) and the cache key are all derived from it
by `run.at_damping(value)`, which the damping sweep uses to refit only the curvature.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import distributed, report, resume
from .cache import content_key
from .config import Config
from .data import CastLoader, Split, load_split, make_loader, validate_labels
from .errors import ConfigError
from .gradients import GradientSource
from .models import build_model, load_model, output_width, resolve_device, weights_sha256
from .objective import Objective, ParamSpace, Problem
from .scores import self_influence
from .solvers import Factored, Solver, make_solver
from .solvers.direct import DirectSolver
from .stats import spearman

ProgressFn = Callable[[str, int, int], None]
PhaseFn = Callable[[int, int], None]


@dataclass
class Report:
    """What a command returns: tables (file name -> frame, SPEC column order), the summary (also
    the `--json` document), the manifest and warnings for the terminal."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


class Timer:
    """Wall seconds per named phase (summed when a phase runs more than once)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - start, 4)


class RowFilter:
    """Re-iterable (row_idx, x, y) batches of `loader` restricted to `rows` (in loader order)."""

    def __init__(self, loader: Any, rows: Sequence[int], n: int) -> None:
        self.loader = loader
        self.mask = torch.zeros(n, dtype=torch.bool)
        self.mask[list(rows)] = True

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for idx, x, y in self.loader:
            keep = self.mask[idx]
            if bool(keep.any()):
                yield idx[keep], x[keep], y[keep]


def require_test(split: Any) -> Any:
    """The test split (config block or loaded Split); ConfigError when the config has none."""
    if split is None:
        raise ConfigError("data.test: required for this command", hint="add a data.test block like data.train")
    return split


class Run:
    """The inputs and shared machinery of one command. Build with `Run.open`."""

    def __init__(self, cfg: Config, command: str, progress: ProgressFn | None, train: Split, test: Split | None,
                 problem: Problem, checkpoint_sha256: str | None) -> None:
        self.cfg, self.command, self.progress = cfg, command, progress
        self.train, self.test, self.problem = train, test, problem
        self.checkpoint_sha256 = checkpoint_sha256
        self.timer = Timer()
        self.cache = resume.open_cache(cfg)
        self.base_key = resume.base_key(cfg, problem, checkpoint_sha256, train.fingerprint)
        self.solver: Solver | None = None
        self.fit_reused = False
        self.warnings: list[str] = []
        self.job: tuple[int, int] | None = None  # --shard i/N: compute only job i's shards, write no report
        self.merge = False  # --merge: compute no shard, read them all from the cache
        self.ranks = 1  # torchrun's world size (the shard layout follows it; see distributed.py)
        self.split: dict[str, Any] | None = None  # the manifest's `distributed` block under torchrun

    def distribute(self, job: tuple[int, int] | None, merge: bool) -> None:
        """`--shard i/N` or `--merge` (no rendezvous: the jobs meet in the cache folder)."""
        if job is None and not merge:
            return
        option = "--merge" if merge else "--shard"
        if self.ranks > 1:
            raise ConfigError(f"{option}: not under torchrun (the ranks already split the rows)",
                              hint="drop torchrun for job arrays, or drop --shard/--merge under torchrun")
        if not self.cache.enabled:
            raise ConfigError(f"{option}: needs the cache (shards meet in cache.dir)",
                              hint="drop --no-cache / cache.enabled: false, and give every job the same cache.dir")
        self.job, self.merge = job, merge

    @classmethod
    def open(cls, cfg: Config, command: str, progress: ProgressFn | None = None, *, need_test: bool = False,
             fresh_model: bool = False) -> Run:
        """Load data and model (the checkpoint, or a seeded fresh model for `train`), validate the
        labels against the model's output width, and assemble the Problem."""
        timer_start = time.perf_counter()
        distributed.exit_unless_rank_zero(command)  # train, check, explain: rank 0 only under torchrun
        device = distributed.device_for(cfg.device, resolve_device(cfg.device))
        env = distributed.environment() if command in distributed.SPLIT_COMMANDS else None
        if env is not None and env[0] != 0:
            progress = None  # ranks other than 0 print nothing but errors
        dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        train = load_split(cfg.data.train, "train", cfg.task)
        test = None
        if need_test:
            test = load_split(require_test(cfg.data.test), "test", cfg.task, classes=train.classes,
                              features=train.features)
        if fresh_model:
            with torch.random.fork_rng(devices=[]):  # the seeded initialization, without touching the global RNG
                torch.manual_seed(cfg.seed)
                model = build_model(cfg.model).to(device=device, dtype=dtype).eval()
            sha = None
        else:
            model = load_model(cfg.model, device, dtype)
            sha = weights_sha256(cfg.model)  # checkpoint, or an hf folder's own weights
        width = output_width(model, train.dataset[0][0].unsqueeze(0).to(device=device, dtype=dtype))
        for split in (train, test):
            if split is not None:
                validate_labels(split, cfg.task, width)
        for p in model.parameters():
            p.requires_grad_(False)
        params = ParamSpace.select(model, cfg.params)
        loader: Any = CastLoader(make_loader(train, cfg.batch_size), dtype)
        ranks, split = 1, None
        if env is not None:
            ranks, split, loader = _split_rows(cfg, command, train, loader, device, env)
        problem = Problem(model=model, objective=Objective(cfg.task, cfg.weight_decay), params=params,
                          train_loader=loader, n=train.n, damping=cfg.solver.damping, hessian=cfg.solver.hessian,
                          seed=cfg.seed)
        run = cls(cfg, command, progress, train, test, problem, sha)
        run.ranks, run.split = ranks, split
        run.timer.phases["load"] = round(time.perf_counter() - timer_start, 4)
        return run

    # ---- inputs ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.problem.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.cfg.dtype == "float64" else torch.float32

    @property
    def damping(self) -> float:
        return self.problem.damping

    def phase(self, name: str) -> PhaseFn | None:
        """The progress callback of one phase (None when nothing renders progress); extra keywords (a loss
        to show) pass through to the CLI's progress(phase, done, total, **info)."""
        progress = self.progress
        if progress is None:
            return None
        return lambda done, total, **info: progress(name, done, total, **info)

    def stream(self, split: Split, rows: Sequence[int] | range | None = None) -> CastLoader:
        """(row_idx, x, y) batches of `split` in the run's dtype: every row, a contiguous range (the
        same batches the full loader has there), or any set of rows (in row order)."""
        if rows is None or isinstance(rows, range):
            return CastLoader(make_loader(split, self.cfg.batch_size, rows=rows), self.dtype)
        return CastLoader(RowFilter(make_loader(split, self.cfg.batch_size), rows, split.n), self.dtype)

    def test_rows(self, test_ids: Sequence[str] | None, option: str = "--test-ids") -> list[int]:
        """Row numbers of the selected test ids (all rows when none are given), in the given order."""
        test = require_test(self.test)
        if not test_ids:
            return list(range(test.n))
        import difflib

        where = {i: r for r, i in enumerate(test.ids)}
        rows = []
        for tid in dict.fromkeys(test_ids):
            if tid not in where:
                close = difflib.get_close_matches(tid, test.ids, n=1)
                raise ConfigError(f"{option}: {tid!r} is not an id of data.test",
                                  hint=f"did you mean {close[0]!r}?" if close else "ids are the data.test id column")
            rows.append(where[tid])
        return rows

    def group_rows(self, column: str | None) -> dict[str, np.ndarray] | None:
        """Row indices per value of the group column (`column`, else data.train.group), first-seen order."""
        train = self.train
        column = column or train.group
        if column is None:
            return None
        if column not in train.extra.columns:
            raise ConfigError(f"--group-by: {column!r} is not a group or carried column of data.train",
                              hint=f"add it to data.train.carry (carried now: {', '.join(train.extra.columns) or 'none'})")
        values = train.extra[column].astype(str).to_numpy()
        names, inverse = np.unique(values, return_inverse=True)
        first_seen = np.argsort([np.flatnonzero(inverse == i)[0] for i in range(len(names))], kind="stable")
        return {str(names[i]): np.flatnonzero(inverse == i) for i in first_seen}

    # ---- curvature ------------------------------------------------------------------------------
    def at_damping(self, damping: float, solver: Solver | None = None) -> None:
        """Make `damping` the run's damping: the Problem, the solver settings and the cache key all
        follow. `solver` is one already fitted at that damping; without it the next `fit()` refits
        the curvature (data and model stay loaded)."""
        cfg = replace(self.cfg, solver=replace(self.cfg.solver, damping=damping))
        self.cfg, self.problem = cfg, replace(self.problem, damping=damping)
        self.solver = solver

    @property
    def solver_key(self) -> dict[str, Any]:
        return resume.solver_key(self.base_key, self.cfg, self.fitted().name)

    def fitted(self) -> Solver:
        if self.solver is None:
            raise ConfigError("internal: run.fit() must come before the solver is used")
        return self.solver

    def fit(self) -> Solver:
        """The solver fitted on the training rows at the run's damping (the cache's copy when it has one)."""
        if self.solver is None:
            with self.timer("fit"):
                solver = make_solver(self.cfg.solver, self.problem)
                key = resume.solver_key(self.base_key, self.cfg, solver.name)
                self.solver, self.fit_reused = resume.fit_solver(self.cache, solver, self.problem, key,
                                                                 self.phase("fit"), fit_allowed=not self.merge)
        return self.solver

    # ---- resumable passes -----------------------------------------------------------------------
    def shard_ranges(self) -> list[range]:
        return resume.shard_ranges(self.train.n, self.cfg.cache.shard_rows, self.cfg.batch_size, self.ranks)

    def shards(self, kind: str, key: dict[str, Any], compute: Callable[[range, PhaseFn | None], dict[str, Any]],
               ) -> Iterator[tuple[range, dict[str, Any], bool]]:
        """(rows, value, reused) for each shard of the training rows, in order. `compute(rows, tick)`
        runs only for shards the cache lacks (tick(done, n) reports rows done over the whole pass);
        `key` holds what the values depend on beyond the solver."""
        ranges = self.shard_ranges()
        name = f"{kind}-{content_key({**self.solver_key, **key, 'shards': [len(ranges), ranges[0].stop]})}"
        n, tick = self.train.n, self.phase("score")

        def run_shard(rows: range, done: int) -> dict[str, Any]:
            step = None if tick is None else (lambda d, _t: tick(done + d, n))
            return compute(rows, step)

        if distributed.active():  # torchrun: this rank's shards, a barrier, then rank 0 alone reads them all
            yield from resume.split_shards(self.cache, name, ranges, run_shard, tick)
            return
        yield from resume.shards(self.cache, name, ranges, run_shard, tick, job=self.job, merge=self.merge)

    def end_split(self) -> None:
        """Under torchrun, after the split part of a command (verify's predictions): ranks other than 0
        exit (RankDone), rank 0 continues alone. A no-op otherwise."""
        distributed.leave()

    def finish_shard(self, computed: int, reused: int) -> Report:
        """The summary of a `--shard i/N` job: which shards it stored; no tables (the merge writes them)."""
        job = self.job or (0, 1)
        ranges = self.shard_ranges()
        mine = [k for k in range(len(ranges)) if resume.job_of(k, len(ranges), job[1]) == job[0]]
        rows = [r for k in mine for r in (ranges[k].start, ranges[k].stop)]
        summary = {"command": self.command, "shard": f"{job[0]}/{job[1]}", "shards_total": len(ranges),
                   "shards": len(mine), "shards_computed": computed, "shards_reused": reused,
                   "rows": [min(rows), max(rows)] if rows else [], "fit_reused": self.fit_reused,
                   "phases_seconds": self.timer.phases}
        return Report({}, summary, {}, list(self.warnings))

    # ---- finishing ------------------------------------------------------------------------------
    def objective_at_checkpoint(self, loss_sum: float, grad_sum: Tensor) -> tuple[float, Tensor]:
        """J = mean loss + 0.5 wd ||theta||^2 and grad J = mean g_i + wd theta, from a pass's sums."""
        problem = self.problem
        flat = problem.params.flatten(problem.params.values(problem.model)).double()
        value = loss_sum / problem.n + float(problem.objective.regularizer(flat))
        return value, grad_sum.to(flat.device) / problem.n + problem.objective.weight_decay * flat

    def finish(self, summary: dict[str, Any], tables: dict[str, pd.DataFrame], *, exact_check: bool = False) -> Report:
        """Add the trust figures, cache figures and manifest; warnings collected on the way. A command
        that fits no solver (verify --fix) gets the manifest without the solver's description."""
        distributed.leave()  # a command that never left the group: the other ranks end here, writing nothing
        solver = self.solver
        if exact_check and solver is not None:
            with self.timer("exact_check"):
                stored, _ = self.cache.cached(f"exact-check-{content_key(self.solver_key)}",
                                              lambda: {"check": exact_agreement(self, solver)})
            if stored["check"] is not None:
                summary["exact_check"] = stored["check"]
        cache = self.cache
        summary["cache"] = {**summary.get("cache", {}), **cache.summary(), "pruned": cache.prune()}
        described = solver.describe() if solver is not None else {}
        warnings = list(described.pop("warnings", [])) + cache.stats.warnings + self.warnings
        if cache.stats.corrupt:
            warnings.append(f"cache: {len(cache.stats.corrupt)} corrupt entries were ignored and recomputed"
                            f" ({', '.join(cache.stats.corrupt[:3])})")
        grad_norm = summary.get("grad_norm_at_checkpoint", 0.0)
        if grad_norm > 1e-3:
            warnings.append(f"the checkpoint is not at a minimum of the objective (gradient norm {grad_norm:.3g}):"
                            " influence assumes one; retrain to convergence (`infl train`) or raise solver.damping")
        train, test = self.train, self.test
        manifest = {
            "command": self.command, "config": self.cfg.to_dict(), "versions": report.environment(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "datasets": {"train": {"fingerprint": train.fingerprint, "n": train.n}}
            | ({"test": {"fingerprint": test.fingerprint, "n": test.n}} if test else {}),
            "n": train.n, "parameters": self.problem.params.size, "parameter_names": list(self.problem.params.names),
            "device": str(self.device), "solver": described, "phases_seconds": self.timer.phases,
            "memory": report.peak_memory(), "summary": summary, "warnings": warnings,
            "run_id": hashlib.sha256(repr((self.command, time.time())).encode()).hexdigest()[:12],
        }
        if self.split is not None:
            manifest["distributed"] = self.split
        summary["solver_details"] = described
        summary["phases_seconds"] = self.timer.phases
        return Report(tables, summary, manifest, warnings)


def _split_rows(cfg: Config, command: str, train: Split, loader: Any, device: torch.device,
                env: tuple[int, int, int]) -> tuple[int, dict[str, Any], distributed.SplitLoader]:
    """Under torchrun: join the group and give the loader this rank's contiguous block of cache shards."""
    rank, size, _ = env
    if command != "verify" and not (cfg.cache.enabled and cfg.cache.dir is not None):
        raise ConfigError(f"torchrun: infl {command} needs the cache (the ranks' shards meet in cache.dir)",
                          hint="drop --no-cache / cache.enabled: false; with several machines give every rank"
                               " the same shared cache.dir")
    ranges = resume.shard_ranges(train.n, cfg.cache.shard_rows, cfg.batch_size, size)
    if len(ranges) < size:
        raise ConfigError(f"torchrun: {size} ranks but the {train.n} training rows make only {len(ranges)} batches"
                          f" of batch_size {cfg.batch_size}", hint="start fewer ranks or lower batch_size")
    world = distributed.start(device)
    blocks = [resume.rank_rows(ranges, r, size) for r in range(size)]
    local = CastLoader(make_loader(train, cfg.batch_size, rows=blocks[rank]), loader.dtype)
    split = {"world_size": size, "backend": world.backend, "rows_per_rank": [len(b) for b in blocks],
             "row_ranges": [[b.start, b.stop] for b in blocks], "shards": len(ranges)}
    return size, split, distributed.SplitLoader(loader, local, blocks[rank])


EXACT_CHECK_MAX_P, EXACT_CHECK_ROWS = 5_000, 256


def exact_agreement(run: Run, solver: Solver) -> dict[str, Any] | None:
    """For an approximate solver on a problem small enough for the exact one: Spearman of
    self-influence with the direct solver's on a seeded random sample of training rows."""
    problem = run.problem
    if solver.name == "direct" or problem.params.size > EXACT_CHECK_MAX_P:
        return None
    exact = DirectSolver(run.cfg.solver).fit(problem)
    generator = torch.Generator().manual_seed(run.cfg.seed)
    count = EXACT_CHECK_ROWS if isinstance(solver, Factored) else 16  # cg/lissa: every row is a solve
    rows = torch.randperm(problem.n, generator=generator)[:count].sort().values
    sample = RowFilter(problem.train_loader, rows.tolist(), problem.n)
    grads = torch.cat([b.grads for b in GradientSource(problem).per_example(sample, run.train.ids)])
    mine, ref = self_influence(grads, solver).cpu().numpy(), self_influence(grads, exact).cpu().numpy()
    rel = float(np.abs(mine - ref).sum() / max(np.abs(ref).sum(), 1e-300))
    return {"rows": len(rows), "self_influence_spearman_vs_direct": spearman(mine, ref) if len(rows) > 2
            else float("nan"), "self_influence_relative_error": rel}
