"""`infl rank`: the influence of every training row on selected test rows and on their mean loss.

Test gradients are solved once (H^-1 g_t, in blocks that fit the memory budget) and the many
training gradients are streamed against them, keeping a running top-K per test row. Optional:
groups.csv (first- and second-order group effects) and FastIF's kNN narrowing.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import report, resume
from .cache import content_key
from .config import Config
from .data import CastLoader, Split, make_loader
from .errors import ConfigError
from .gradients import BLOCK_BYTES, GradientSource
from .groups import group_effects, mean_loss_hvp
from .knn import candidate_loader, check_knn, knn_neighbors
from .pipeline import ProgressFn, Report, Timer, _finish, _only_rows, _phase, load_inputs, require_test
from .scores import loss_change_if_removed
from .solvers import make_solver


def rank(cfg: Config, progress: ProgressFn | None = None, top: int = 10,
         test_ids: Sequence[str] | None = None, group_by: str | None = None, knn: int | None = None,
         knn_metric: str = "kfac") -> Report:
    """loss_change_if_removed of every training row on each selected test row (top K each way)
    and on the mean loss of the selected test rows (every training row); with a group column,
    each group's first- and second-order effect on that mean loss (groups.csv)."""
    if top < 1:
        raise ConfigError(f"--top: must be >= 1, got {top}")
    if knn is not None:
        check_knn(knn, knn_metric)
    timer = Timer()
    with timer("load"):
        inp = load_inputs(cfg, need_test=True)
    problem, train, test = inp.problem, inp.train, require_test(inp.test)
    rows = _select_test_rows(test, test_ids)
    groups = group_rows(train, group_by)
    source = GradientSource(problem)
    cache = resume.open_cache(cfg)
    with timer("fit"):
        solver = make_solver(cfg.solver, problem)
        solver_parts = resume.solver_key(resume.base_key(cfg, problem, inp.checkpoint_sha256, train.fingerprint), cfg,
                                         solver.name)
        solver, fit_reused = resume.fit_solver(cache, solver, problem, solver_parts, _phase(progress, "fit"))
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    test_loader = CastLoader(_only_rows(make_loader(test, cfg.batch_size), rows, test.n), dtype)
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
            found = knn_neighbors(problem, train, test_loader, rows, knn, knn_metric)
            neighbors, candidates = found.rows, torch.unique(found.rows).tolist()
    train_stream = (problem.train_loader if candidates is None
                    else candidate_loader(train, candidates, cfg.batch_size, dtype))
    scored = n if candidates is None else len(candidates)
    k = min(top, n)
    helpful = (torch.full((t_count, k), -math.inf, dtype=torch.float64), torch.zeros((t_count, k), dtype=torch.long))
    harmful = (torch.full((t_count, k), math.inf, dtype=torch.float64), torch.zeros((t_count, k), dtype=torch.long))
    overall = np.zeros(n) if candidates is None else np.full(n, np.nan)
    grad_sum, loss_sum = torch.zeros(p, dtype=torch.float64, device=inp.device), 0.0
    per_block = max(1, BLOCK_BYTES // (8 * p))
    ranges = resume.shard_ranges(n, cfg.cache.shard_rows, cfg.batch_size)
    shard_key = {**solver_parts, "test": test.fingerprint, "rows": content_key({"rows": rows}), "top": k,
                 "per_block": per_block, "shards": [len(ranges), ranges[0].stop]}
    reused = total_shards = 0
    with timer("score"):
        for start in range(0, t_count, per_block):
            block_rows = rows[start : start + per_block]
            first, lo, hi = start == 0, start, start + len(block_rows)
            solve = functools.cache(partial(_block_ihvp, solver, source, test, block_rows, kept if keep_all else None,
                                            mean_grad if first else None, cfg.batch_size, dtype))  # once, if needed
            if first and groups is not None:
                mean_ihvp = solve()[-1]
            if neighbors is not None:  # FastIF: each test row only ranks its own nearest training rows
                ihvp = solve()
                for b in source.per_example(train_stream, train.ids, _phase(progress, "score"), scored):
                    scores = loss_change_if_removed(ihvp, b.grads, n).cpu()
                    if first:
                        overall[b.idx.numpy()] = scores[-1].numpy()
                        scores = scores[:-1]
                    allowed = (neighbors[lo:hi, :, None] == b.idx[None, None, :]).any(dim=1)
                    _merge_top(helpful, lo, hi, scores.masked_fill(~allowed, -math.inf), b.idx, largest=True)
                    _merge_top(harmful, lo, hi, scores.masked_fill(~allowed, math.inf), b.idx, largest=False)
                continue
            compute = partial(_score_shard, inp, source, solve, first, hi - lo, k, progress)
            name = f"rank-{content_key({**shard_key, 'start': start})}"
            for shard, part, was_cached in resume.shards(cache, name, ranges, compute, _phase(progress, "score")):
                if first:  # the mean test loss, and grad J from this pass over every row
                    overall[shard.start : shard.stop] = part["overall"].numpy()
                    grad_sum += part["grad_sum"].to(inp.device)
                    loss_sum += part["loss_sum"]
                _merge_top(helpful, lo, hi, part["helpful_values"], part["helpful_rows"], largest=True)
                _merge_top(harmful, lo, hi, part["harmful_values"], part["harmful_rows"], largest=False)
                reused += was_cached
                total_shards += 1
    with timer("checkpoint_gradient"):
        if candidates is None:  # J = mean loss + reg; grad J = mean g_i + wd theta, from the first pass
            flat = problem.params.flatten(problem.params.values(problem.model)).double()
            value = loss_sum / n + float(problem.objective.regularizer(flat))
            grad_j = grad_sum / n + problem.objective.weight_decay * flat
        else:  # --knn streamed only the candidates: from its pass over every row
            value, grad_j = found.objective, found.objective_grad
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
        summary["knn"] = {"k": knn, "metric": knn_metric, "candidates_per_test_row": int(neighbors.shape[1]),
                          "scored_rows": scored, "scored_fraction": scored / n,
                          "scoring_speedup_bound": n / max(scored, 1), "layers": list(found.layers),
                          "layers_skipped": list(found.layers_skipped)}
    summary["cache"] = {"fit_reused": fit_reused, "shards": total_shards, "shards_reused": reused}
    return _finish("rank", inp, solver, timer, summary, tables, cache, solver_parts)


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
            close = difflib.get_close_matches(tid, test.ids, n=1)
            raise ConfigError(f"--test-ids: {tid!r} is not an id of data.test",
                              hint=f"did you mean {close[0]!r}?" if close else "ids are the data.test id column")
        rows.append(where[tid])
    return rows


def _block_ihvp(solver: Any, source: GradientSource, test: Split, block_rows: list[int], kept: dict[int, Tensor] | None,
                mean_grad: Tensor | None, batch_size: int, dtype: torch.dtype) -> Tensor:
    """H^-1 of the test gradients of `block_rows` (from `kept`, else recomputed), with the mean
    test gradient appended as the last row when given."""
    if kept is not None:
        grads = torch.stack([kept[r] for r in block_rows])
    else:
        sub = CastLoader(_only_rows(make_loader(test, batch_size), block_rows, test.n), dtype)
        got = {r: g for b in source.per_example(sub, test.ids) for r, g in zip(b.idx.tolist(), b.grads, strict=True)}
        grads = torch.stack([got[r] for r in block_rows]).double()
    return solver.ihvp(torch.cat([grads, mean_grad[None]]) if mean_grad is not None else grads)


def _score_shard(inp: Any, source: GradientSource, solve: Any, first: bool, count: int, k: int,
                 progress: ProgressFn | None, rows: range, done: int) -> dict[str, Any]:
    """One shard of training rows against one block of `count` test rows: each test row's own top k
    both ways (merged across shards in order), and, for the first block, the rows' effect on the
    mean test loss with their part of grad J."""
    n, ihvp = inp.train.n, solve()
    helpful = (torch.full((count, k), -math.inf, dtype=torch.float64), torch.zeros((count, k), dtype=torch.long))
    harmful = (torch.full((count, k), math.inf, dtype=torch.float64), torch.zeros((count, k), dtype=torch.long))
    overall = torch.zeros(len(rows), dtype=torch.float64)
    grad_sum, loss_sum = torch.zeros(inp.problem.params.size, dtype=torch.float64), 0.0
    tick = _phase(progress, "score")
    step = None if tick is None else (lambda d, _t: tick(done + d, n))
    for b in source.per_example(inp.train_rows(rows), inp.train.ids, step, n):
        scores = loss_change_if_removed(ihvp, b.grads, n).cpu()
        if first:
            overall[b.idx - rows.start] = scores[-1]
            grad_sum += b.grads.double().sum(0).cpu()
            loss_sum += float(b.losses.double().sum())
            scores = scores[:-1]
        _merge_top(helpful, 0, count, scores, b.idx, largest=True)
        _merge_top(harmful, 0, count, scores, b.idx, largest=False)
    return {"overall": overall if first else None, "grad_sum": grad_sum if first else None, "loss_sum": loss_sum,
            "helpful_values": helpful[0], "helpful_rows": helpful[1], "harmful_values": harmful[0],
            "harmful_rows": harmful[1]}


def _merge_top(state: tuple[Tensor, Tensor], lo: int, hi: int, scores: Tensor, idx: Tensor, largest: bool) -> None:
    values, rows = state
    cand_v = torch.cat([values[lo:hi], scores.to(torch.float64)], dim=1)
    cand_i = torch.cat([rows[lo:hi], idx.expand(hi - lo, -1) if idx.dim() == 1 else idx], dim=1)
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


