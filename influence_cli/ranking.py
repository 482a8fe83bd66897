"""`infl rank`: the influence of every training row on selected test rows and on their mean loss.

Test gradients are solved once (H^-1 g_t, in blocks that fit the memory budget) and the many
training gradients are streamed against them, keeping a running top-K per test row. Optional:
groups.csv (first- and second-order group effects) and FastIF's kNN narrowing.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import report
from .config import Config
from .data import CastLoader, Split, make_loader
from .errors import ConfigError
from .gradients import BLOCK_BYTES, GradientSource
from .groups import group_effects, mean_loss_hvp
from .objective import Problem
from .pipeline import ProgressFn, Report, Timer, _finish, _only_rows, _phase, _Rows, load_inputs, require_test
from .scores import loss_change_if_removed
from .solvers import make_solver


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
    problem, train, test = inp.problem, inp.train, require_test(inp.test)
    rows = _select_test_rows(test, test_ids)
    groups = group_rows(train, group_by)
    source = GradientSource(problem)
    with timer("fit"):
        solver = make_solver(cfg.solver, problem).fit(problem, _phase(progress, "fit"))
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
            neighbors = knn_neighbors(problem, test_loader, rows, knn, knn_metric)
            candidates = torch.unique(neighbors).tolist()
    train_stream = problem.train_loader if candidates is None else _only_rows(problem.train_loader, candidates, n)
    scored = n if candidates is None else len(candidates)
    k = min(top, n)
    helpful = (torch.full((t_count, k), -math.inf, dtype=torch.float64), torch.zeros((t_count, k), dtype=torch.long))
    harmful = (torch.full((t_count, k), math.inf, dtype=torch.float64), torch.zeros((t_count, k), dtype=torch.long))
    overall = np.zeros(n) if candidates is None else np.full(n, np.nan)
    grad_sum, loss_sum = torch.zeros(p, dtype=torch.float64, device=inp.device), 0.0
    per_block = max(1, BLOCK_BYTES // (8 * p))
    with timer("score"):
        for start in range(0, t_count, per_block):
            block_rows = rows[start : start + per_block]
            if keep_all:
                grads = torch.stack([kept[r] for r in block_rows])
            else:
                sub = CastLoader(_only_rows(make_loader(test, cfg.batch_size), block_rows, test.n), dtype)
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
                    grad_sum += b.grads.double().sum(0)  # grad J from this pass (when it covers every row)
                    loss_sum += float(b.losses.double().sum())
                    scores = scores[:-1]
                if neighbors is not None:  # FastIF: each test row only ranks its own nearest training rows
                    allowed = (neighbors[lo:hi, :, None] == b.idx[None, None, :]).any(dim=1)
                    _merge_top(helpful, lo, hi, scores.masked_fill(~allowed, -math.inf), b.idx, largest=True)
                    _merge_top(harmful, lo, hi, scores.masked_fill(~allowed, math.inf), b.idx, largest=False)
                    continue
                _merge_top(helpful, lo, hi, scores, b.idx, largest=True)
                _merge_top(harmful, lo, hi, scores, b.idx, largest=False)
    with timer("checkpoint_gradient"):
        if candidates is None:  # J = mean loss + reg; grad J = mean g_i + wd theta, from the first pass
            flat = problem.params.flatten(problem.params.values(problem.model)).double()
            value = loss_sum / n + float(problem.objective.regularizer(flat))
            grad_j = grad_sum / n + problem.objective.weight_decay * flat
        else:  # --knn streamed only the candidates
            value, grad_j = source.objective_gradient()
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


