"""`infl rank`: the influence of every training row on selected test rows and on their mean loss.

Test gradients are solved once (H^-1 g_t, a chunk of rows per solver call) and held in the run's
dtype (float32 by default: T x p x 4 bytes, up to HELD_BYTES per streamed pass); the many training
gradients are streamed against them in resumable shards, keeping a running top-K per test row. The
training gradients come from layer factors where the model allows (factored.py: one forward and one
backward per batch, no per-row vmap), so scoring costs about the (T, p) x (p, B) matmul, and with the
bfloat16 screen (screen.py, `rank.screen`) about a bfloat16 matmul plus float32 scores for the few pairs that
can reach a top K; the mean test row (overall.csv, grad J) is scored in float64, from the layer factors
(factored.float64_pass) where the gradients came from them. Optional: groups.csv (first- and second-order
group effects) and FastIF's kNN narrowing. INFL_RANK_SCORING=legacy (benchmarks and equality tests
only) forces the previous path: vmap per-example gradients against float64 solves in blocks of
BLOCK_BYTES / (8 p) test rows, one streamed pass per block.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import lowrank, report
from ..cache import content_key
from ..data import Split
from ..errors import ConfigError
from ..factored import FactoredGradients
from ..gradients import BLOCK_BYTES, GradientSource
from ..groups import group_effects, mean_loss_change, mean_loss_hvp
from ..health import accuracy_warnings
from ..knn import Neighbors, candidate_loader, check_knn, knn_neighbors
from ..lowrank import LowRankScreen
from ..run import PhaseFn, Report, Run
from ..scores import loss_change_if_removed
from ..screen import Screen
from ..screen import plan as screen_plan
from . import rank_groups
from .images import rank_strips
from .sweep import damping_sweep

TopK = tuple[Tensor, Tensor]  # (values (T, k) float64, training rows (T, k) int64)
SCORING_ENV = "INFL_RANK_SCORING"  # "legacy": the previous scoring path (benchmarks, equality tests)
SOLVE_BYTES = BLOCK_BYTES // 32  # one solver call on (rows, p) float64 of this size (a solver holds a few copies)
HELD_BYTES = BLOCK_BYTES  # the test-side solves held during one streamed pass, in the run's dtype


@dataclass(frozen=True)
class RankOptions:
    top: int = 10
    test_ids: Sequence[str] | None = None
    group_by: str | None = None
    knn: int | None = None
    knn_metric: str = "kfac"
    damping_sweep: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.top, bool) or self.top < 1:
            raise ConfigError(f"--top: must be >= 1, got {self.top}")
        if self.knn is not None:
            check_knn(self.knn, self.knn_metric)


def rank(run: Run, options: RankOptions = RankOptions()) -> Report:
    """The rank report of an opened run (with its test split): see the module docstring; under
    --shard i/N only the job's shards of the streamed pass, stored in the cache."""
    if run.job is not None or run.merge:
        if options.knn is not None:
            raise ConfigError("--knn: not with --shard/--merge (the kNN pass is not sharded)")
    if run.job is not None:
        run.fit()
        rows = run.test_rows(options.test_ids)
        scoring = _scoring(run, len(rows))
        test = _test_gradients(run, rows, scoring)
        scored = _score_all(run, test, min(options.top, run.train.n), scoring)
        return run.finish_shard(scored["shards"] - scored["reused"], scored["reused"])
    tables, summary, mean_ihvp = score(run, options)
    if options.damping_sweep:
        summary["damping_sweep"] = damping_sweep(run, tables, lambda: score(run, options)[0], "overall.csv",
                                                 "loss_change_if_removed", descending=False)
    if "groups.csv" in tables:  # measured by retraining where the estimate is not to be trusted
        frame, summary["group_retrain"] = rank_groups.with_retrained(
            run, tables["groups.csv"], run.group_rows(options.group_by), run.test_rows(options.test_ids), mean_ihvp)
        tables["groups.csv"] = frame
        if (line := rank_groups.warning(frame, summary["group_retrain"])) is not None:
            run.warnings.append(line)
    with run.timer("strips"):  # image data: rank_strips.png, each test image with its top training images
        cfg = run.cfg
        norms = tuple((c.mean, c.std) for c in (cfg.data.test or cfg.data.train, cfg.data.train))
        tables.update(rank_strips(run.test, run.train, tables["helpful.csv"], tables["harmful.csv"],  # type: ignore[arg-type]
                                  min(options.top, 8), *norms))
    return run.finish(summary, tables, exact_check=True)


@dataclass(frozen=True)
class _Scoring:
    """How the training rows are streamed: their gradient source (factored or per-example autograd), the dtype
    the test-side solves are held in, test rows per streamed pass, and what the summary says about it."""

    source: Any
    dtype: torch.dtype
    per_block: int
    legacy: bool
    info: dict[str, Any]
    screen: bool = False  # a bfloat16 screen of each block's product (screen.py), decided per run
    low_rank: bool = False  # try the low-rank screen (lowrank.py) on each block of held solves first


def _scoring(run: Run, test_rows: int) -> _Scoring:
    p = run.problem.params.size
    if os.environ.get(SCORING_ENV) == "legacy":
        return _Scoring(GradientSource(run.problem), torch.float64, max(1, BLOCK_BYTES // (8 * p)), True,
                        {"gradients": "per_example", "solves_dtype": "float64", "legacy": True})
    factored, why = FactoredGradients.plan(run.problem)
    info = factored.describe() if factored is not None else {"gradients": "per_example", "reason": why}
    per_block = max(1, HELD_BYTES // (run.dtype.itemsize * p))
    info.update(solves_dtype=str(run.dtype).removeprefix("torch."), test_rows_per_pass=per_block)
    use, info["screen"] = screen_plan(run.cfg.rank.screen, run.dtype, min(test_rows, per_block), p, run.train.n,
                                      run.device)
    low_rank = lowrank.plan(run.cfg.rank.screen, run.dtype, min(test_rows, per_block), p, run.train.n,
                            factored is not None)
    return _Scoring(factored if factored is not None else GradientSource(run.problem), run.dtype, per_block, False,
                    info, use, low_rank)


@dataclass
class _Test:
    """The selected test rows, their loader, the mean test gradient and (when small) every gradient."""

    rows: list[int]
    loader: Any
    mean_grad: Tensor
    loss: float
    kept: dict[int, Tensor] | None
    source: Any  # where the test gradients come from (FactoredGradients or GradientSource)


def score(run: Run, options: RankOptions) -> tuple[dict[str, pd.DataFrame], dict[str, Any], Any]:
    """(tables, summary, () -> H^-1 of the selected test rows' mean gradient, solved once) at the run's damping."""
    train, n = run.train, run.train.n
    groups = run.group_rows(options.group_by)
    solver = run.fit()
    rows = run.test_rows(options.test_ids)
    scoring = _scoring(run, len(rows))
    test = _test_gradients(run, rows, scoring)
    k = min(options.top, n)
    found = None
    if options.knn is not None:
        with run.timer("knn"):
            found = knn_neighbors(run.problem, train, test.loader, test.rows, options.knn, options.knn_metric)
    with run.timer("score"):
        scored = (_score_knn(run, test, k, found, scoring) if found is not None
                  else _score_all(run, test, k, scoring))
    helpful, harmful, overall, mean_ihvp = scored["helpful"], scored["harmful"], scored["overall"], scored["mean_ihvp"]
    with run.timer("checkpoint_gradient"):
        if found is None:  # J and grad J from the first pass over every row
            value, grad_j = run.objective_at_checkpoint(scored["loss_sum"], scored["grad_sum"])
        else:  # --knn streamed only the candidates: from its pass over every row
            value, grad_j = found.objective, found.objective_grad
    test_split: Split = run.test  # type: ignore[assignment]
    test_names = test_split.label_names(test_split.labels[test.rows])
    train_names = train.label_names(train.labels)
    tables = {"helpful.csv": _pair_table(test_split, test.rows, test_names, train, train_names, helpful, True),
              "harmful.csv": _pair_table(test_split, test.rows, test_names, train, train_names, harmful, False)}
    order = report.order_asc(overall)
    order = order[~np.isnan(overall[order])]  # --knn: only rows some test row has among its neighbors
    tables["overall.csv"] = report.with_extra(pd.DataFrame(
        {"rank": np.arange(1, len(order) + 1), "id": np.asarray(train.ids, dtype=object)[order],
         "label": np.asarray(train_names, dtype=object)[order], "loss_change_if_removed": overall[order]},
        columns=report.OVERALL_COLUMNS), train.extra, order)
    if groups is not None:
        with run.timer("groups"):
            source = GradientSource(run.problem)
            tables["groups.csv"] = group_effects(
                run.problem, solver, mean_ihvp(), groups, lambda: source.per_example(run.problem.train_loader, train.ids),
                test_hvp=mean_loss_hvp(run.problem, test.loader, len(test.rows)),
                test_loss_change=mean_loss_change(run.problem, test.loader, len(test.rows)), progress=run.phase("groups"))
    summary: dict[str, Any] = {
        "command": "rank", "n": n, "test_examples": len(test.rows), "parameters": run.problem.params.size,
        "solver": solver.name, "top": k, "mean_test_loss": test.loss / len(test.rows),
        "objective_at_checkpoint": value, "grad_norm_at_checkpoint": float(grad_j.norm()),
        "most_harmful": [train.ids[i] for i in order[: min(5, n)]],
        "most_helpful": [train.ids[i] for i in order[::-1][: min(5, n)]],
    }
    if found is None and scored["correct"] is not None and run.problem.objective.task != "regression":
        summary["train_accuracy"] = scored["correct"] / n  # counted in the scoring pass over every row
        run.warnings.extend(accuracy_warnings(summary["train_accuracy"], "check the checkpoint and `infl train`"))
    if found is not None:
        summary["knn"] = _knn_summary(options, found, scored["scored_rows"], n)
    summary["scoring"] = scoring.info
    summary["cache"] = {"fit_reused": run.fit_reused, "shards": scored["shards"], "shards_reused": scored["reused"]}
    return tables, summary, mean_ihvp


def _test_gradients(run: Run, rows: list[int], scoring: _Scoring) -> _Test:
    """One pass over the selected test rows: their mean gradient and loss, and every gradient (in the
    run's dtype) when the (T, p) block fits the memory budget (legacy: BLOCK_BYTES; else one solver
    call's SOLVE_BYTES, so that kept gradients and held solves never coexist at size)."""
    p, source = run.problem.params.size, scoring.source
    loader = run.stream(run.test, rows)  # type: ignore[arg-type]
    keep_all = len(rows) * p * run.dtype.itemsize <= (BLOCK_BYTES if scoring.legacy else SOLVE_BYTES)
    kept: dict[int, Tensor] = {}
    total = torch.zeros(p, dtype=torch.float64, device=run.device)
    loss = 0.0
    with run.timer("test_gradients"):
        for block in source.per_example(loader, run.test.ids):  # type: ignore[union-attr]
            total += _float64_pass(None, block.grads)[1]
            loss += float(block.losses.double().sum())
            if keep_all:
                kept.update(zip(block.idx.tolist(), block.grads, strict=True))
    return _Test(rows, loader, total / len(rows), loss, kept if keep_all else None, source)


def _block_ihvp(run: Run, test: _Test, block_rows: list[int], with_mean: bool) -> Tensor:
    """H^-1 of the test gradients of `block_rows` (kept, else recomputed), with the mean test
    gradient appended as the last row when `with_mean`."""
    if test.kept is not None:
        grads = torch.stack([test.kept[r] for r in block_rows]).double()
    else:
        sub = run.stream(run.test, block_rows)  # type: ignore[arg-type]
        got = {r: g for b in test.source.per_example(sub, run.test.ids)  # type: ignore[union-attr]
               for r, g in zip(b.idx.tolist(), b.grads, strict=True)}
        grads = torch.stack([got[r] for r in block_rows]).double()
    return run.fitted().ihvp(torch.cat([grads, test.mean_grad[None]]) if with_mean else grads)


def _empty_top(count: int, k: int) -> tuple[TopK, TopK]:
    return ((torch.full((count, k), -math.inf, dtype=torch.float64), torch.zeros((count, k), dtype=torch.long)),
            (torch.full((count, k), math.inf, dtype=torch.float64), torch.zeros((count, k), dtype=torch.long)))


def _score_all(run: Run, test: _Test, k: int, scoring: _Scoring) -> dict[str, Any]:
    """Every training row against every selected test row, test rows in blocks of `scoring.per_block` (one
    streamed pass each); the first block also carries the mean test gradient (overall.csv, groups, grad J)."""
    n, p, t_count = run.train.n, run.problem.params.size, len(test.rows)
    helpful, harmful = _empty_top(t_count, k)
    screened: dict[str, int] = {}
    out: dict[str, Any] = {"overall": np.zeros(n), "grad_sum": torch.zeros(p, dtype=torch.float64), "loss_sum": 0.0,
                           "correct": 0, "shards": 0, "reused": 0, "mean_ihvp": None}
    for start in range(0, t_count, scoring.per_block):
        block_rows = test.rows[start : start + scoring.per_block]
        first, lo, hi = start == 0, start, start + len(block_rows)
        solve = functools.cache(functools.partial(_held_solves, run, test, block_rows, first, scoring))  # if asked
        screen = functools.cache(lambda solve=solve: _screen(run, solve()[0], scoring))
        floor = functools.partial(_floor, helpful, harmful, lo, hi)  # what earlier shards already reached
        if first:
            out["mean_ihvp"] = lambda solve=solve: solve()[1]  # solved only if asked (groups)
        key = {"test": run.test.fingerprint,  # type: ignore[union-attr]
               "rows": content_key({"rows": test.rows}), "top": k, "per_block": scoring.per_block, "start": start,
               "scoring": "legacy" if scoring.legacy else [scoring.info["gradients"], scoring.info["solves_dtype"]]}
        compute = functools.partial(_score_shard, run, scoring.source, solve, first, hi - lo, k, screen, floor)
        for shard, part, reused in run.shards("rank", key, compute):
            if first:
                out["overall"][shard.start : shard.stop] = part["overall"].numpy()
                out["grad_sum"] += part["grad_sum"]
                out["loss_sum"] += part["loss_sum"]
                # shards cached before the count was kept have none: the accuracy is then unknown
                out["correct"] = None if out["correct"] is None or part.get("correct") is None else (
                    out["correct"] + part["correct"])
            merge_top(helpful, lo, hi, part["helpful_values"], part["helpful_rows"], largest=True)
            merge_top(harmful, lo, hi, part["harmful_values"], part["harmful_rows"], largest=False)
            out["shards"] += 1
            out["reused"] += reused
        if screen.cache_info().currsize and screen() is not None:
            kind = "low_rank" if isinstance(screen(), LowRankScreen) else "screen"
            for key_, value in screen().stats.items():
                screened.setdefault(kind, {})[key_] = screened.get(kind, {}).get(key_, 0) + value
    for kind, counts in screened.items():
        scoring.info[kind].update(counts, rescored_fraction=counts["rescored"] / max(counts["pairs"], 1))
    return {**out, "helpful": helpful, "harmful": harmful}


def _screen(run: Run, held: Tensor, scoring: _Scoring) -> Screen | LowRankScreen | None:
    """The screen of one block of held solves: low rank (lowrank.py, exact) when the held solves allow it, else
    the bfloat16 screen (screen.py) when the run uses one, else None (the plain float32 product)."""
    if scoring.low_rank:
        source = scoring.source
        low, about = LowRankScreen.build(held, source.layers, source.slots(), seed=run.cfg.seed)
        scoring.info["low_rank"] = about
        if low is not None:
            return low
    if not scoring.screen:
        return None
    return Screen.build(held, GradientSource(run.problem).rows_per_block(), seed=run.cfg.seed)


def _floor(helpful: TopK, harmful: TopK, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(K-th largest, K-th smallest) score so far of test rows lo..hi (-inf / +inf before any)."""
    return helpful[0][lo:hi].min(1).values, harmful[0][lo:hi].max(1).values


def _held_solves(run: Run, test: _Test, block_rows: list[int], with_mean: bool, scoring: _Scoring
                 ) -> tuple[Tensor, Tensor | None]:
    """(H^-1 g_t for `block_rows` (T_b, p) in `scoring.dtype`, H^-1 of the mean test gradient (p,) float64 when
    `with_mean`), on the run's device. Legacy: one solver call for the block; else calls on chunks of
    SOLVE_BYTES / (8 p) rows, each cast to the held dtype as it comes (peak: the held solves plus one call)."""
    if scoring.legacy:
        ihvp = _block_ihvp(run, test, block_rows, with_mean)
        return (ihvp[:-1], ihvp[-1]) if with_mean else (ihvp, None)
    p = run.problem.params.size
    step = max(1, SOLVE_BYTES // (8 * p))
    held = torch.empty(len(block_rows), p, dtype=scoring.dtype, device=run.device)
    mean = None
    for s in range(0, len(block_rows), step):
        part = block_rows[s : s + step]
        solved = _block_ihvp(run, test, part, with_mean and s == 0).to(run.device)
        if with_mean and s == 0:
            mean, solved = solved[-1].double(), solved[:-1]
        held[s : s + len(part)] = solved.to(scoring.dtype)
        del solved
    if block_rows[-1] == test.rows[-1]:  # every block solved: the kept test gradients are not needed again
        test.kept = None
    return held, mean


def _score_knn(run: Run, test: _Test, k: int, found: Neighbors, scoring: _Scoring) -> dict[str, Any]:
    """FastIF: each test row ranks only its own nearest training rows (candidates streamed once per
    block of test rows, no shards); the first block also carries the mean test gradient."""
    n, t_count, p = run.train.n, len(test.rows), run.problem.params.size
    candidates = torch.unique(found.rows).tolist()
    stream = candidate_loader(run.train, candidates, run.cfg.batch_size, run.dtype)
    helpful, harmful = _empty_top(t_count, k)
    overall, mean_ihvp = np.full(n, np.nan), None
    per_block = max(1, BLOCK_BYTES // (8 * p))
    for lo in range(0, t_count, per_block):
        block_rows = test.rows[lo : lo + per_block]
        hi, first = lo + len(block_rows), lo == 0
        ihvp = _block_ihvp(run, test, block_rows, first)
        for b in scoring.source.per_example(stream, run.train.ids, run.phase("score"), len(candidates)):
            scores = loss_change_if_removed(ihvp, b.grads, n).cpu()
            if first:
                overall[b.idx.numpy()] = scores[-1].numpy()
                scores = scores[:-1]
            allowed = (found.rows[lo:hi, :, None] == b.idx[None, None, :]).any(dim=1)
            merge_top(helpful, lo, hi, scores.masked_fill(~allowed, -math.inf), b.idx, largest=True)
            merge_top(harmful, lo, hi, scores.masked_fill(~allowed, math.inf), b.idx, largest=False)
        if first:
            mean_ihvp = ihvp[-1]
    return {"helpful": helpful, "harmful": harmful, "overall": overall, "mean_ihvp": lambda: mean_ihvp,
            "scored_rows": len(candidates), "shards": 0, "reused": 0}


def _knn_summary(options: RankOptions, found: Neighbors, scored: int, n: int) -> dict[str, Any]:
    return {"k": options.knn, "metric": options.knn_metric, "candidates_per_test_row": int(found.rows.shape[1]),
            "scored_rows": scored, "scored_fraction": scored / n, "scoring_speedup_bound": n / max(scored, 1),
            "layers": list(found.layers), "layers_skipped": list(found.layers_skipped)}


def _score_shard(run: Run, source: Any, solve: Any, first: bool, count: int, k: int, screen: Any, floor: Any,
                 rows: range, tick: PhaseFn | None) -> dict[str, Any]:
    """One shard of training rows (gradients from `source`) against one block of `count` test rows (their
    held solves): each test row's own top k both ways (merged across shards in order), and, for the first
    block, the rows' effect on the mean test loss (float64) with their part of grad J. With a screen (screen.py),
    only the pairs that can beat this shard's running K-th values, or those earlier shards reached (`floor()`),
    are scored in float32."""
    n, (held, mean) = run.train.n, solve()
    screen = screen()
    if screen is not None:
        reached = floor()
    helpful, harmful = _empty_top(count, k)
    overall = torch.zeros(len(rows), dtype=torch.float64)
    grad_sum, loss_sum = torch.zeros(run.problem.params.size, dtype=torch.float64), 0.0
    correct = 0 if first and run.problem.objective.task != "regression" else None
    reuse = {"reuse": True} if isinstance(source, FactoredGradients) else {}
    for b in source.per_example(run.stream(run.train, rows), run.train.ids, tick, n, **reuse):
        if screen is not None:
            above = torch.maximum(helpful[0].min(1).values, reached[0])
            below = torch.minimum(harmful[0].max(1).values, reached[1])
            high, low = screen.scores(b.grads, 1.0 / n, k, _to_float32(above, -math.inf, held.device),
                                      _to_float32(below, math.inf, held.device), factors=b.factors)
            merge_top(helpful, 0, count, high.cpu(), b.idx, largest=True)
            merge_top(harmful, 0, count, low.cpu(), b.idx, largest=False)
        else:
            scores = loss_change_if_removed(held, b.grads, n).cpu()
            merge_top(helpful, 0, count, scores, b.idx, largest=True)
            merge_top(harmful, 0, count, scores, b.idx, largest=False)
        if first:
            mean_scores, column_sums = (source.float64_pass(b, mean) if isinstance(source, FactoredGradients)
                                        else _float64_pass(mean, b.grads))
            overall[b.idx - rows.start] = (mean_scores / n).cpu()
            grad_sum += column_sums.cpu()
            loss_sum += float(b.losses.double().sum())
            if correct is not None:
                predicted = run.problem.objective.predict(b.outputs, b.targets)[0]
                correct += int((predicted.cpu() == b.targets.reshape(-1).long().cpu()).sum())
    return {"overall": overall if first else None, "grad_sum": grad_sum if first else None, "loss_sum": loss_sum,
            "correct": correct, "helpful_values": helpful[0], "helpful_rows": helpful[1], "harmful_values": harmful[0],
            "harmful_rows": harmful[1]}


def _to_float32(values: Tensor, toward: float, device: torch.device) -> Tensor:
    """float64 thresholds as float32 rounded toward `toward` (-inf: never above the float64 value), on `device`."""
    low = values.float()
    return torch.nextafter(low, torch.full_like(low, toward)).where(low.double() != values, low).to(device)


def _float64_pass(mean: Tensor | None, grads: Tensor, columns: int = 4096) -> tuple[Tensor, Tensor]:
    """(grads @ mean (B,) (zeros without a mean), grads summed over rows (p,)), float64, from grads (B, p) in any
    dtype converted a few thousand columns at a time (no float64 copy of the block)."""
    scores = torch.zeros(len(grads), dtype=torch.float64, device=grads.device)
    sums = torch.empty(grads.shape[1], dtype=torch.float64, device=grads.device)
    for c in range(0, grads.shape[1], columns):
        part = grads[:, c : c + columns].double()
        if mean is not None:
            scores += part @ mean[c : c + columns]
        sums[c : c + columns] = part.sum(0)
    return scores, sums


def merge_top(state: TopK, lo: int, hi: int, scores: Tensor, idx: Tensor, largest: bool) -> None:
    """Fold (hi-lo, B) scores of training rows `idx` into rows lo..hi of a running top-k, in place."""
    values, rows = state
    cand_v = torch.cat([values[lo:hi], scores.to(torch.float64)], dim=1)
    cand_i = torch.cat([rows[lo:hi], idx.expand(hi - lo, -1) if idx.dim() == 1 else idx], dim=1)
    best, pos = torch.topk(cand_v, values.shape[1], dim=1, largest=largest, sorted=False)
    values[lo:hi] = best
    rows[lo:hi] = torch.gather(cand_i, 1, pos)


def _pair_table(test: Split, rows: list[int], test_labels: list, train: Split, train_names: list, state: TopK,
                descending: bool) -> pd.DataFrame:
    values, idx = state[0].numpy(), state[1].numpy()
    names, ids = np.asarray(train_names, dtype=object), np.asarray(train.ids, dtype=object)
    records = []
    for t, r in enumerate(rows):
        order = np.lexsort((idx[t], -values[t] if descending else values[t]))
        for rank_, j in enumerate(order, start=1):
            records.append((test.ids[r], test_labels[t], rank_, ids[idx[t, j]], names[idx[t, j]], values[t, j],
                            idx[t, j]))
    frame = pd.DataFrame.from_records(records, columns=[*report.PAIR_COLUMNS, "_row"])
    return report.with_extra(frame, train.extra, frame.pop("_row").to_numpy())
