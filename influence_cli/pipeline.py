"""The commands as library calls: load inputs, fit the solver, stream gradients, build reports.

Each public function takes a validated Config and an optional progress callback
`progress(phase, done, total)`, never prints, and returns a `Report` (tables, summary, manifest,
warnings); the CLI writes and renders it. Phases are timed for the manifest.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import report
from .config import Config
from .data import Split, load_split, make_loader, validate_labels
from .errors import ConfigError
from .gradients import BLOCK_BYTES, GradientSource
from .groups import group_effects, mean_loss_hvp
from .models import build_model, load_model, output_width, resolve_device, save_checkpoint, sha256_file
from .objective import Objective, ParamSpace, Problem
from .scores import flag_rows, loss_change_if_removed, self_influence
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
        if cfg.data.test is None:
            raise ConfigError("data.test: required for this command", hint="add a data.test block like data.train")
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
    loader = _Cast(make_loader(train, cfg.batch_size), dtype)
    problem = Problem(model=model, objective=Objective(cfg.task, cfg.weight_decay), params=params,
                      train_loader=loader, n=train.n, damping=cfg.solver.damping, hessian=cfg.solver.hessian,
                      seed=cfg.seed)
    return Inputs(cfg, device, train, test, problem, sha)


RANK_BY = ("self_influence", "loo_loss", "loss")
NEWTON_LOO_MAX = (64, 50_000)  # Newton LOO needs C half-solves per row: only up to C outputs, p parameters


def selfcheck(cfg: Config, progress: ProgressFn | None = None, rank_by: str = "self_influence") -> Report:
    """Self-influence g_i^T H^-1 g_i of every training row, ranked, with a flag for likely errors.
    Also each row's training-loss rank and an estimate of its leave-one-out loss (signals.py)."""
    if rank_by not in RANK_BY:
        raise ConfigError(f"--rank-by: {rank_by!r} is not one of {', '.join(RANK_BY)}")
    timer = Timer()
    with timer("load"):
        inp = load_inputs(cfg)
    problem, train = inp.problem, inp.train
    source = GradientSource(problem)
    with timer("checkpoint_gradient"):
        value, grad_j = source.objective_gradient()
    with timer("fit"):
        solver = make_solver(cfg.solver, problem).fit(problem, _phase(progress, "fit"))
    n = train.n
    si, loss = np.zeros(n), np.zeros(n)
    pred = np.zeros(n) if cfg.task == "regression" else np.zeros(n, dtype=np.int64)
    prob = None if cfg.task == "regression" else np.zeros(n)
    with timer("score"):
        # a solver that scores rows without their p-sized gradients (EK-FAC's outer products) does so
        fast = getattr(solver, "self_influence_blocks", None)
        blocks = (fast(problem.train_loader, _phase(progress, "score"), n, train.ids) if fast is not None
                  else source.per_example(problem.train_loader, train.ids, _phase(progress, "score"), n))
        for block in blocks:
            rows = block.idx.numpy()
            si[rows] = (block.self_influence if fast is not None else self_influence(block.grads, solver)).cpu().numpy()
            loss[rows] = block.losses.detach().double().cpu().numpy()
            p_hat, p_label = problem.objective.predict(block.outputs, block.targets)
            pred[rows] = p_hat.detach().cpu().numpy()
            if prob is not None:
                prob[rows] = p_label.detach().double().cpu().numpy()
    with timer("loo_loss"):
        width = int(problem.objective.output_hessian(block.outputs[:1], block.targets[:1])[0].shape[1])
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
    return _finish("selfcheck", inp, solver, timer, summary, {"selfcheck.csv": table})


def rank(cfg: Config, progress: ProgressFn | None = None, top: int = 10,
         test_ids: Sequence[str] | None = None, group_by: str | None = None, knn: int | None = None,
         knn_metric: str = "cosine") -> Report:
    """loss_change_if_removed of every training row on each selected test row (top K each way)
    and on the mean loss of the selected test rows (every training row); with a group column,
    each group's first- and second-order effect on that mean loss (groups.csv)."""
    if top < 1:
        raise ConfigError(f"--top: must be >= 1, got {top}")
    timer = Timer()
    with timer("load"):
        inp = load_inputs(cfg, need_test=True)
    problem, train, test = inp.problem, inp.train, inp.test
    assert test is not None
    rows = _select_test_rows(test, test_ids)
    groups = group_rows(train, group_by)
    source = GradientSource(problem)
    with timer("checkpoint_gradient"):
        value, grad_j = source.objective_gradient()
    with timer("fit"):
        solver = make_solver(cfg.solver, problem).fit(problem, _phase(progress, "fit"))
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    test_loader = _Cast(_only_rows(make_loader(test, cfg.batch_size), rows, test.n), dtype)
    p, t_count, n = problem.params.size, len(rows), train.n
    with timer("test_gradients"):
        kept: dict[int, Tensor] = {}
        total = torch.zeros(p, dtype=torch.float64, device=inp.device)
        keep_all = t_count * p * 8 <= BLOCK_BYTES
        test_loss = 0.0
        for block in source.per_example(test_loader, test.ids):
            total += block.grads.double().sum(0)
            test_loss += float(block.losses.double().sum())
            if keep_all:
                kept.update(zip(block.idx.tolist(), block.grads.double(), strict=True))
        mean_grad = total / t_count
    candidates, neighbors = None, None
    if knn is not None:
        with timer("knn"):
            neighbors = knn_neighbors(problem, test_loader, rows, knn, knn_metric)
            candidates = torch.unique(neighbors).tolist()
    train_stream = problem.train_loader if candidates is None else _only_rows(problem.train_loader, candidates, n)
    scored = n if candidates is None else len(candidates)
    k = min(top, n)
    helpful = (torch.full((t_count, k), -math.inf, dtype=torch.float64), torch.zeros((t_count, k), dtype=torch.long))
    harmful = (torch.full((t_count, k), math.inf, dtype=torch.float64), torch.zeros((t_count, k), dtype=torch.long))
    overall = np.zeros(n) if candidates is None else np.full(n, np.nan)
    per_block = max(1, BLOCK_BYTES // (8 * p))
    position = {r: i for i, r in enumerate(rows)}
    with timer("score"):
        for start in range(0, t_count, per_block):
            block_rows = rows[start : start + per_block]
            if keep_all:
                grads = torch.stack([kept[r] for r in block_rows])
            else:
                sub = _Cast(_only_rows(make_loader(test, cfg.batch_size), block_rows, test.n), dtype)
                got = {r: g for b in source.per_example(sub, test.ids) for r, g in zip(b.idx.tolist(), b.grads, strict=True)}
                grads = torch.stack([got[r] for r in block_rows]).double()
            first = start == 0
            targets = torch.cat([grads, mean_grad[None]]) if first else grads
            ihvp = solver.ihvp(targets)
            if first:
                mean_ihvp = ihvp[-1]
            lo, hi = start, start + len(block_rows)
            for b in source.per_example(train_stream, train.ids, _phase(progress, "score"), scored):
                scores = loss_change_if_removed(ihvp, b.grads, n).cpu()
                if first:
                    overall[b.idx.numpy()] = scores[-1].numpy()
                    scores = scores[:-1]
                if neighbors is not None:  # FastIF: each test row only ranks its own nearest training rows
                    allowed = (neighbors[lo:hi, :, None] == b.idx[None, None, :]).any(dim=1)
                    _merge_top(helpful, lo, hi, scores.masked_fill(~allowed, -math.inf), b.idx, largest=True)
                    _merge_top(harmful, lo, hi, scores.masked_fill(~allowed, math.inf), b.idx, largest=False)
                    continue
                _merge_top(helpful, lo, hi, scores, b.idx, largest=True)
                _merge_top(harmful, lo, hi, scores, b.idx, largest=False)
    del position
    test_label_names = test.label_names(test.labels[rows])
    train_names = train.label_names(train.labels)
    tables = {
        "helpful.csv": _pair_table(test, rows, test_label_names, train, train_names, helpful, descending=True),
        "harmful.csv": _pair_table(test, rows, test_label_names, train, train_names, harmful, descending=False),
    }
    order = report.order_asc(overall)
    order = order[~np.isnan(overall[order])]  # --knn: only rows some test row has among its neighbors
    overall_table = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "id": np.asarray(train.ids, dtype=object)[order],
                                  "label": np.asarray(train_names, dtype=object)[order],
                                  "loss_change_if_removed": overall[order]}, columns=report.OVERALL_COLUMNS)
    tables["overall.csv"] = report.with_extra(overall_table, train.extra, order)
    if groups is not None:
        with timer("groups"):
            tables["groups.csv"] = group_effects(
                problem, solver, mean_ihvp, groups, lambda: source.per_example(problem.train_loader, train.ids),
                test_hvp=mean_loss_hvp(problem, test_loader, t_count), progress=_phase(progress, "groups"))
    summary = {
        "command": "rank", "n": n, "test_examples": t_count, "parameters": p, "solver": solver.name,
        "top": k, "mean_test_loss": test_loss / t_count,
        "objective_at_checkpoint": value, "grad_norm_at_checkpoint": float(grad_j.norm()),
        "most_harmful": [train.ids[i] for i in order[: min(5, n)]],
        "most_helpful": [train.ids[i] for i in order[::-1][: min(5, n)]],
    }
    if neighbors is not None:
        summary["knn"] = {"k": knn, "metric": knn_metric, "scored_rows": scored, "scored_fraction": scored / n,
                          "scoring_speedup_bound": n / max(scored, 1)}
    return _finish("rank", inp, solver, timer, summary, tables)


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
    shuffled = _Cast(make_loader(inp.train, cfg.batch_size, shuffle=True, generator=generator), final_dtype)
    with timer("train"):
        result = _minimize_all(cfg, inp, final_dtype, shuffled, progress)
        selected = [dict(model.named_parameters())[n] for n in problem.params.names]
        polished = None
        if cfg.train.optimizer != "lbfgs" and cfg.train.polish:
            # influence needs a stationary point in the parameters it differentiates: finish those with L-BFGS
            model.to(torch.float64)
            polished = minimize(model, selected, problem.objective, _Cast(make_loader(inp.train, cfg.batch_size),
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
    loader = _Cast(make_loader(inp.train, cfg.batch_size), work)
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
    summary = {"command": "check", "n": n, "n_test": inp.test.n if inp.test else None, "parameters": p,
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


class _Cast:
    """A re-iterable loader whose floating inputs are cast to the compute dtype."""

    def __init__(self, loader: Any, dtype: torch.dtype) -> None:
        self.loader, self.dtype = loader, dtype

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for idx, x, y in self.loader:
            yield idx, (x.to(self.dtype) if x.is_floating_point() else x), y


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


def knn_neighbors(problem: Problem, test_loader: Any, rows: list[int], k: int, metric: str) -> Tensor:
    """FastIF (Guo et al. 2021): the k nearest training rows of each selected test row (T, k), in the
    model's penultimate features (the input of its last Linear layer), cosine or L2."""
    if k < 1:
        raise ConfigError(f"--knn: must be >= 1, got {k}")
    if metric not in ("cosine", "l2"):
        raise ConfigError(f"--knn-metric: {metric!r} is not cosine or l2")
    linears = [m for m in problem.model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ConfigError("--knn: the model has no Linear layer whose input could serve as features")

    def features(loader: Any) -> tuple[Tensor, Tensor]:
        seen: list[Tensor] = []
        handle = linears[-1].register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].flatten(1)))
        idx_all, feats = [], []
        try:
            with torch.no_grad():
                for idx, x, _ in loader:
                    seen.clear()
                    problem.model(x.to(problem.device))
                    idx_all.append(idx)
                    feats.append(seen[0].float())
        finally:
            handle.remove()
        f = torch.cat(feats)
        return torch.cat(idx_all), (torch.nn.functional.normalize(f, dim=1) if metric == "cosine" else f)

    test_idx, test_f = features(test_loader)
    order = {int(r): i for i, r in enumerate(test_idx)}
    test_f = test_f[[order[r] for r in rows]]
    best = torch.full((len(rows), 0), -math.inf), torch.zeros((len(rows), 0), dtype=torch.long)
    for idx, f in [features(_Rows(*batch)) for batch in problem.train_loader]:
        sim = test_f @ f.T if metric == "cosine" else -torch.cdist(test_f, f).square()
        values, pos = torch.cat([best[0], sim], 1), torch.cat([best[1], idx.expand(len(rows), -1)], 1)
        top, where = torch.topk(values, min(k, values.shape[1]), dim=1)
        best = top, torch.gather(pos, 1, where)
    return best[1]


def group_rows(train: Split, column: str | None) -> dict[str, np.ndarray] | None:
    """Row indices per value of the group column (--group-by, else data.train.group), in first-seen order."""
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


def _select_test_rows(test: Split, test_ids: Sequence[str] | None) -> list[int]:
    if not test_ids:
        return list(range(test.n))
    where = {i: r for r, i in enumerate(test.ids)}
    rows = []
    for tid in dict.fromkeys(test_ids):
        if tid not in where:
            import difflib

            close = difflib.get_close_matches(tid, test.ids, n=1)
            raise ConfigError(f"--test-ids: {tid!r} is not an id of data.test",
                              hint=f"did you mean {close[0]!r}?" if close else "ids are the data.test id column")
        rows.append(where[tid])
    return rows


def _merge_top(state: tuple[Tensor, Tensor], lo: int, hi: int, scores: Tensor, idx: Tensor, largest: bool) -> None:
    values, rows = state
    cand_v = torch.cat([values[lo:hi], scores.to(torch.float64)], dim=1)
    cand_i = torch.cat([rows[lo:hi], idx.expand(hi - lo, -1)], dim=1)
    k = values.shape[1]
    best, pos = torch.topk(cand_v, k, dim=1, largest=largest, sorted=False)
    values[lo:hi] = best
    rows[lo:hi] = torch.gather(cand_i, 1, pos)


def _pair_table(test: Split, rows: list[int], test_labels: list, train: Split, train_names: list,
                state: tuple[Tensor, Tensor], descending: bool) -> pd.DataFrame:
    values, idx = state[0].numpy(), state[1].numpy()
    records = []
    names = np.asarray(train_names, dtype=object)
    ids = np.asarray(train.ids, dtype=object)
    for t, r in enumerate(rows):
        order = np.lexsort((idx[t], -values[t] if descending else values[t]))
        for rank_, j in enumerate(order, start=1):
            records.append((test.ids[r], test_labels[t], rank_, ids[idx[t, j]], names[idx[t, j]], values[t, j],
                            idx[t, j]))
    frame = pd.DataFrame.from_records(records, columns=[*report.PAIR_COLUMNS, "_row"])
    rows_used = frame.pop("_row").to_numpy()
    return report.with_extra(frame, train.extra, rows_used)


EXACT_CHECK_MAX_P, EXACT_CHECK_ROWS = 5_000, 256


def exact_agreement(inp: Inputs, solver: Any, source: GradientSource) -> dict[str, Any] | None:
    """For an approximate solver on a problem small enough for the exact one: Spearman of
    self-influence with the direct solver's on a seeded random sample of training rows."""
    problem = inp.problem
    if solver.name == "direct" or problem.params.size > EXACT_CHECK_MAX_P:
        return None
    exact = DirectSolver(inp.cfg.solver).fit(problem)
    generator = torch.Generator().manual_seed(inp.cfg.seed)
    rows = torch.randperm(problem.n, generator=generator)[:EXACT_CHECK_ROWS].sort().values
    sample = _only_rows(problem.train_loader, rows.tolist(), problem.n)
    grads = torch.cat([b.grads for b in source.per_example(sample, inp.train.ids)])
    mine, ref = self_influence(grads, solver).cpu().numpy(), self_influence(grads, exact).cpu().numpy()
    ranks = [pd.Series(v).rank().to_numpy() for v in (mine, ref)]
    spearman = float(np.corrcoef(*ranks)[0, 1]) if len(rows) > 2 else float("nan")
    rel = float(np.abs(mine - ref).sum() / max(np.abs(ref).sum(), 1e-300))
    return {"rows": len(rows), "self_influence_spearman_vs_direct": spearman, "self_influence_relative_error": rel}


def _finish(command: str, inp: Inputs, solver: Any, timer: Timer, summary: dict[str, Any],
            tables: dict[str, pd.DataFrame]) -> Report:
    if command in ("selfcheck", "rank"):
        with timer("exact_check"):
            check = exact_agreement(inp, solver, GradientSource(inp.problem))
        if check is not None:
            summary["exact_check"] = check
    described = solver.describe()
    warnings = list(described.pop("warnings", []))
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
