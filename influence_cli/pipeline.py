"""The commands as library calls: load inputs, fit the solver, stream gradients, build reports.

Each public function takes a validated Config and an optional progress callback
`progress(phase, done, total)`, never prints, and returns a `Report` (tables, summary, manifest,
warnings); the CLI writes and renders it. Phases are timed for the manifest.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import report, resume
from .cache import Cache, content_key
from .config import Config
from .data import CastLoader, Split, load_split, make_loader, validate_labels
from .errors import ConfigError
from .gradients import GradientSource
from .models import build_model, load_model, output_width, resolve_device, save_checkpoint, sha256_file
from .objective import Objective, ParamSpace, Problem
from .scores import flag_rows, self_influence
from .signals import loo_loss, loo_loss_first_order, loss_rank
from .solvers import SOLVERS, Factored, choose, make_solver
from .solvers.direct import DirectSolver
from .train import minimize

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Report:
    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    cfg: Config
    device: torch.device
    train: Split
    test: Split | None
    problem: Problem
    checkpoint_sha256: str | None

    def train_rows(self, rows: range) -> CastLoader:
        """The training loader restricted to contiguous `rows` (same batches as the full one there)."""
        dtype = torch.float64 if self.cfg.dtype == "float64" else torch.float32
        return CastLoader(make_loader(self.train, self.cfg.batch_size, rows=rows), dtype)


class Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - start, 4)


def load_inputs(cfg: Config, *, need_test: bool = False, fresh_model: bool = False) -> Inputs:
    """Data, model (checkpoint unless fresh_model), labels validated, the Problem assembled."""
    device = resolve_device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    for folder in (str(Path.cwd()), str(cfg.source.parent) if cfg.source else None):  # where hooks live
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    torch.manual_seed(cfg.seed)
    train = load_split(cfg.data.train, "train", cfg.task)
    test = None
    if need_test:
        require_test(cfg.data.test)
        test = load_split(cfg.data.test, "test", cfg.task, classes=train.classes)
    if fresh_model:
        model = build_model(cfg.model).to(device=device, dtype=dtype).eval()
        sha = None
    else:
        model = load_model(cfg.model, device, dtype)
        sha = sha256_file(cfg.model.checkpoint)
    width = output_width(model, train.dataset[0][0].unsqueeze(0).to(device=device, dtype=dtype))
    for split in (train, test):
        if split is not None:
            validate_labels(split, cfg.task, width)
    for p in model.parameters():
        p.requires_grad_(False)
    params = ParamSpace.select(model, cfg.params)
    loader = CastLoader(make_loader(train, cfg.batch_size), dtype)
    problem = Problem(model=model, objective=Objective(cfg.task, cfg.weight_decay), params=params,
                      train_loader=loader, n=train.n, damping=cfg.solver.damping, hessian=cfg.solver.hessian,
                      seed=cfg.seed)
    return Inputs(cfg, device, train, test, problem, sha)


RANK_BY = ("self_influence", "loo_loss", "loss")
NEWTON_LOO_MAX = (64, 50_000)  # Newton LOO needs C half-solves per row: only up to C outputs, p parameters


def require_test(split: Any) -> Any:
    """The test split (config block or loaded Split); ConfigError when the config has none."""
    if split is None:
        raise ConfigError("data.test: required for this command", hint="add a data.test block like data.train")
    return split


def selfcheck(cfg: Config, progress: ProgressFn | None = None, rank_by: str = "self_influence") -> Report:
    """Self-influence g_i^T H^-1 g_i of every training row, ranked, with a flag for likely errors.
    Also each row's training-loss rank and an estimate of its leave-one-out loss (signals.py)."""
    if rank_by not in RANK_BY:
        raise ConfigError(f"--rank-by: {rank_by!r} is not one of {', '.join(RANK_BY)}")
    timer = Timer()
    with timer("load"):
        inp = load_inputs(cfg)
    problem, train, n = inp.problem, inp.train, inp.train.n
    cache = resume.open_cache(cfg)
    base = resume.base_key(cfg, problem, inp.checkpoint_sha256, train.fingerprint)
    with timer("fit"):
        solver = make_solver(cfg.solver, problem)
        solver_parts = resume.solver_key(base, cfg, solver.name)
        solver, fit_reused = resume.fit_solver(cache, solver, problem, solver_parts, _phase(progress, "fit"))
    si, loss = np.zeros(n), np.zeros(n)
    pred = np.zeros(n) if cfg.task == "regression" else np.zeros(n, dtype=np.int64)
    prob = None if cfg.task == "regression" else np.zeros(n)
    grad_sum = torch.zeros(problem.params.size, dtype=torch.float64, device=inp.device)
    # a solver that scores rows without their p-sized gradients (EK-FAC's outer products) does so
    fast = getattr(solver, "self_influence_blocks", None)
    ranges = resume.shard_ranges(n, cfg.cache.shard_rows, cfg.batch_size)
    name = f"selfcheck-{content_key({**solver_parts, 'shards': [len(ranges), ranges[0].stop]})}"
    reused = 0
    with timer("score"):
        for rows, part, was_cached in resume.shards(
                cache, name, ranges, partial(_score_rows, inp, solver, fast, progress), _phase(progress, "score")):
            window = slice(rows.start, rows.stop)
            si[window], loss[window], pred[window] = part["si"].numpy(), part["loss"].numpy(), part["pred"].numpy()
            if prob is not None:
                prob[window] = part["prob"].numpy()
            if part["grad_sum"] is not None:
                grad_sum += part["grad_sum"].to(inp.device)
            reused += was_cached
    with timer("checkpoint_gradient"):
        if fast is None:  # J = mean loss + reg; grad J = mean g_i + wd theta, from the pass just made
            flat = problem.params.flatten(problem.params.values(problem.model)).double()
            value = float(loss.mean()) + float(problem.objective.regularizer(flat))
            grad_j = grad_sum / n + problem.objective.weight_decay * flat
        else:
            stored, _ = cache.cached(f"objective-gradient-{content_key(base)}", lambda: dict(
                zip(("value", "grad"), GradientSource(problem).objective_gradient(), strict=True)))
            value, grad_j = stored["value"], stored["grad"].to(inp.device)
    with timer("loo_loss"):
        width = _output_width(inp)
        # the Newton form costs C half-solves per row (~C x the scoring pass): only when ranking by it
        newton = (rank_by == "loo_loss" and isinstance(solver, Factored) and width <= NEWTON_LOO_MAX[0]
                  and problem.params.size <= NEWTON_LOO_MAX[1])
        loo = (loo_loss(problem, solver, progress=_phase(progress, "loo")).loo_loss if newton
               else loo_loss_first_order(loss, si, n))
    labels = train.labels.numpy()
    mismatch = None if cfg.task == "regression" else pred != labels.reshape(n)
    flagged = flag_rows(si, mismatch, cfg.selfcheck)
    label_names = train.label_names(train.labels)
    predicted = train.label_names(torch.from_numpy(pred)) if cfg.task != "regression" else pred
    suggested = None
    if cfg.task != "regression":
        suggested = np.where(flagged, np.asarray(predicted, dtype=object), "")
    key = {"self_influence": si, "loo_loss": loo, "loss": loss}[rank_by]
    signals = {"loss_rank": loss_rank(loss), "loo_loss": loo}
    table = report.selfcheck_table(train.ids, label_names, predicted, prob, loss, si, flagged, suggested, train.extra,
                                   signals, key)
    summary = {
        "command": "selfcheck", "n": n, "parameters": problem.params.size, "solver": solver.name,
        "rank_by": rank_by, "loo_loss_method": "newton" if newton else "first_order",
        "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
        "objective_at_checkpoint": value, "grad_norm_at_checkpoint": float(grad_j.norm()),
    }
    if mismatch is not None:
        summary["train_accuracy"] = float(1 - mismatch.mean())
    summary["cache"] = {"fit_reused": fit_reused, "shards": len(ranges), "shards_reused": reused}
    return _finish("selfcheck", inp, solver, timer, summary, {"selfcheck.csv": table}, cache, solver_parts)


def _score_rows(inp: Inputs, solver: Any, fast: Any, progress: ProgressFn | None, rows: range,
                done: int) -> dict[str, Any]:
    """selfcheck's per-row results for one shard of training rows (contiguous `rows`)."""
    problem, n, count = inp.problem, inp.train.n, len(rows)
    loader = inp.train_rows(rows)
    tick = _phase(progress, "score")
    step = None if tick is None else (lambda d, _t: tick(done + d, n))
    blocks = (fast(loader, step, n, inp.train.ids) if fast is not None
              else GradientSource(problem).per_example(loader, inp.train.ids, step, n))
    out = {"si": torch.zeros(count, dtype=torch.float64), "loss": torch.zeros(count, dtype=torch.float64),
           "pred": torch.zeros(count, dtype=torch.float64 if inp.cfg.task == "regression" else torch.int64),
           "prob": torch.zeros(count, dtype=torch.float64),
           "grad_sum": None if fast is not None else torch.zeros(problem.params.size, dtype=torch.float64)}
    for block in blocks:
        local = block.idx - rows.start
        if fast is None:
            out["si"][local] = self_influence(block.grads, solver).cpu()
            out["grad_sum"] += block.grads.double().sum(0).cpu()  # the objective's gradient, for free
        else:
            out["si"][local] = block.self_influence.double().cpu()
        out["loss"][local] = block.losses.detach().double().cpu()
        p_hat, p_label = problem.objective.predict(block.outputs, block.targets)
        out["pred"][local] = p_hat.detach().cpu().to(out["pred"].dtype)
        if p_label is not None:
            out["prob"][local] = p_label.detach().double().cpu()
    return out


def _output_width(inp: Inputs) -> int:
    """Columns of the output Hessian (C for C classes): one forward of the first training row."""
    problem = inp.problem
    _, x, y = next(iter(inp.train_rows(range(0, 1))))
    with torch.no_grad():
        out = problem.model(x.to(problem.device))
    return int(problem.objective.output_hessian(out, y.to(problem.device))[0].shape[1])


def train(cfg: Config, progress: ProgressFn | None = None) -> Report:
    """Train the configured model from a seeded initialization; the CLI saves the checkpoint."""
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: required by `infl train` (where to write the weights)")
    timer = Timer()
    with timer("load"):
        inp = load_inputs(cfg, fresh_model=True)
    model, problem = inp.problem.model, inp.problem
    final_dtype = next(model.parameters()).dtype
    for p in model.parameters():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(cfg.seed)
    shuffled = CastLoader(make_loader(inp.train, cfg.batch_size, shuffle=True, generator=generator), final_dtype)
    with timer("train"):
        result = _minimize_all(cfg, inp, final_dtype, shuffled, progress)
        selected = [dict(model.named_parameters())[n] for n in problem.params.names]
        polished = None
        if cfg.train.optimizer != "lbfgs" and cfg.train.polish:
            # influence needs a stationary point in the parameters it differentiates: finish those with L-BFGS
            model.to(torch.float64)
            polished = minimize(model, selected, problem.objective, CastLoader(make_loader(inp.train, cfg.batch_size),
                                torch.float64), problem.n, replace(cfg.train, optimizer="lbfgs", lr=1.0, epochs=200),
                                progress=_phase(progress, "polish"))
    model.to(final_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    with timer("save"):
        save_checkpoint(model, cfg.model.checkpoint)
    final = polished or result
    summary = {"command": "train", "n": problem.n, "parameters": sum(p.numel() for p in model.parameters()),
               "optimizer": cfg.train.optimizer, "objective": final.objective, "grad_norm": final.grad_norm,
               "grad_norm_all_parameters": result.grad_norm, "polished": polished is not None,
               "iterations": result.iterations, "converged": final.converged,
               "checkpoint": str(cfg.model.checkpoint)}
    warnings = []
    if not final.converged:
        warnings.append(f"training stopped at gradient norm {final.grad_norm:.3g} > train.tol={cfg.train.tol:g}"
                        " after the last epoch: influence assumes an optimum; raise train.epochs")
    return Report({}, summary, {"phases": timer.phases}, warnings)


def _minimize_all(cfg: Config, inp: Inputs, dtype: torch.dtype, shuffled: Any, progress: ProgressFn | None) -> Any:
    """Train every parameter; L-BFGS runs in float64 (its line search needs it to reach a small gradient)."""
    model, problem = inp.problem.model, inp.problem
    work = torch.float64 if cfg.train.optimizer == "lbfgs" else dtype
    model.to(work)
    loader = CastLoader(make_loader(inp.train, cfg.batch_size), work)
    return minimize(model, list(model.parameters()), problem.objective, loader, problem.n, cfg.train,
                    shuffled=shuffled, progress=_phase(progress, "train"))


def check(cfg: Config) -> Report:
    """Validate the config, load data and model, estimate the solver's time and memory; no heavy work."""
    timer = Timer()
    with timer("load"):
        inp = load_inputs(cfg, need_test=cfg.data.test is not None)
    problem, n, p = inp.problem, inp.train.n, inp.problem.params.size
    source = GradientSource(problem)
    idx, x, y = next(iter(problem.train_loader))
    sample = _Rows(idx[:32], x[:32], y[:32])
    start = time.perf_counter()
    for _ in source.per_example(sample):
        pass
    per_row = (time.perf_counter() - start) / len(sample.idx)
    name, reason = choose(cfg.solver, problem) if cfg.solver.name == "auto" else (cfg.solver.name, "configured")
    estimates = {}
    for solver_name, cls in SOLVERS.items():
        cost = cls.estimate(cfg.solver, n, p)
        estimates[solver_name] = {"memory_bytes": cost.memory_bytes, "fit_seconds": round(cost.fit_flops / _flops(), 2),
                                  "note": cost.note}
    cache = resume.open_cache(cfg)
    key = resume.solver_key(resume.base_key(cfg, problem, inp.checkpoint_sha256, inp.train.fingerprint), cfg, name)
    summary = {"command": "check", "n": n, "n_test": inp.test.n if inp.test else None, "parameters": p,
               "cache": {"dir": str(cache.root) if cache.root else None,
                         "fit_cached": cache.has(resume.fit_name(name, key))},
               "parameters_total": sum(q.numel() for q in problem.model.parameters()),
               "selected": list(problem.params.names), "solver": name, "solver_reason": reason,
               "device": str(inp.device),
               "gradient_seconds": round(per_row * n, 2), "solver_estimates": estimates,
               "config": cfg.to_dict()}
    return Report({}, summary, {"phases": timer.phases})


# ---- helpers ----------------------------------------------------------------------------------
@dataclass
class _Rows:
    idx: Tensor
    x: Tensor
    y: Tensor

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        yield self.idx, self.x, self.y


class _only_rows:  # noqa: N801 - used like a function
    """Re-iterable filter of a loader to the given rows (in loader order)."""

    def __init__(self, loader: Any, rows: Sequence[int], n: int) -> None:
        self.loader = loader
        self.mask = torch.zeros(n, dtype=torch.bool)
        self.mask[list(rows)] = True

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for idx, x, y in self.loader:
            keep = self.mask[idx]
            if bool(keep.any()):
                yield idx[keep], x[keep], y[keep]


EXACT_CHECK_MAX_P, EXACT_CHECK_ROWS = 5_000, 256


def exact_agreement(inp: Inputs, solver: Any, source: GradientSource) -> dict[str, Any] | None:
    """For an approximate solver on a problem small enough for the exact one: Spearman of
    self-influence with the direct solver's on a seeded random sample of training rows."""
    problem = inp.problem
    if solver.name == "direct" or problem.params.size > EXACT_CHECK_MAX_P:
        return None
    exact = DirectSolver(inp.cfg.solver).fit(problem)
    generator = torch.Generator().manual_seed(inp.cfg.seed)
    count = EXACT_CHECK_ROWS if isinstance(solver, Factored) else 16  # cg/lissa: every row is a solve
    rows = torch.randperm(problem.n, generator=generator)[:count].sort().values
    sample = _only_rows(problem.train_loader, rows.tolist(), problem.n)
    grads = torch.cat([b.grads for b in source.per_example(sample, inp.train.ids)])
    mine, ref = self_influence(grads, solver).cpu().numpy(), self_influence(grads, exact).cpu().numpy()
    ranks = [pd.Series(v).rank().to_numpy() for v in (mine, ref)]
    spearman = float(np.corrcoef(*ranks)[0, 1]) if len(rows) > 2 else float("nan")
    rel = float(np.abs(mine - ref).sum() / max(np.abs(ref).sum(), 1e-300))
    return {"rows": len(rows), "self_influence_spearman_vs_direct": spearman, "self_influence_relative_error": rel}


def _finish(command: str, inp: Inputs, solver: Any, timer: Timer, summary: dict[str, Any],
            tables: dict[str, pd.DataFrame], cache: Cache | None = None, key: dict[str, Any] | None = None) -> Report:
    cache = cache or Cache(None)
    if command in ("selfcheck", "rank"):
        with timer("exact_check"):
            name = f"exact-check-{content_key(key or {})}"
            check = cache.get(name) if key is not None else None
            if check is None:
                check = exact_agreement(inp, solver, GradientSource(inp.problem))
                if key is not None:
                    cache.put(name, {"check": check})
            else:
                check = check["check"]
        if check is not None:
            summary["exact_check"] = check
    summary["cache"] = {**summary.get("cache", {}), **cache.summary(), "pruned": cache.prune()}
    described = solver.describe()
    warnings = list(described.pop("warnings", [])) + cache.stats.warnings
    if cache.stats.corrupt:
        warnings.append(f"cache: {len(cache.stats.corrupt)} corrupt entries were ignored and recomputed"
                        f" ({', '.join(cache.stats.corrupt[:3])})")
    grad_norm = summary.get("grad_norm_at_checkpoint", 0.0)
    if grad_norm > 1e-3:
        warnings.append(f"the checkpoint is not at a minimum of the objective (gradient norm {grad_norm:.3g}):"
                        " influence assumes one; retrain to convergence (`infl train`) or raise solver.damping")
    manifest = {
        "command": command, "config": inp.cfg.to_dict(), "versions": report.environment(),
        "checkpoint_sha256": inp.checkpoint_sha256,
        "datasets": {"train": {"fingerprint": inp.train.fingerprint, "n": inp.train.n}}
        | ({"test": {"fingerprint": inp.test.fingerprint, "n": inp.test.n}} if inp.test else {}),
        "n": inp.train.n, "parameters": inp.problem.params.size, "parameter_names": list(inp.problem.params.names),
        "device": str(inp.device), "solver": described, "phases_seconds": timer.phases,
        "memory": report.peak_memory(), "summary": summary, "warnings": warnings,
        "run_id": hashlib.sha256(repr((command, time.time())).encode()).hexdigest()[:12],
    }
    summary["solver_details"] = described
    summary["phases_seconds"] = timer.phases
    return Report(tables, summary, manifest, warnings)


def _phase(progress: ProgressFn | None, name: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)


_FLOPS: list[float] = []


def _flops() -> float:
    """float64 matmul speed of this device, measured once (for estimates only)."""
    if not _FLOPS:
        a = torch.randn(512, 512, dtype=torch.float64)
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        _FLOPS.append(4 * 2 * 512**3 / max(time.perf_counter() - start, 1e-6))
    return _FLOPS[0]
