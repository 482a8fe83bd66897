"""rank's groups.csv, measured by retraining where the estimate is not to be trusted (`rank.group_retrain`).

The Newton step of removing a group (group_newton.py) is exact for quadratic objectives and holds on logistic
regression at groups of 5-40% of the rows; on a network that fits its labels it can miss by 10x and in sign
(README, "Trusting the numbers"), and group_effects marks such groups `trusted: false`. Groups are few (sources,
annotators, batches), so rank measures those instead, as `infl verify --groups` does (retrain.py): a reference
retrain from the checkpoint with nothing removed, then one retrain without each group, warm-started from the
checkpoint with the `train:` recipe, the change of the mean test loss over the selected test rows measured
against the reference.

`auto` retrains the untrusted groups, largest |estimate| first, while the next retrain is priced to end within
`rank.group_retrain_budget` seconds: the first at crossfit.estimate_seconds for one training (its passes over the
data, priced on a batch: an upper figure, since a retrain starts at the checkpoint), each later one at the
slowest retrain so far. `true` retrains every group, without a budget; `false` keeps the estimates. Measured
effects are cached by content (checkpoint, data, test rows, recipe, the group's rows), so a nightly rerun on the
same data retrains nothing. Under torchrun rank 0 retrains alone (the other ranks have finished their part). The
retrains run with verify's thread rule (`retrain_threads`: one torch thread below 100k parameters).

groups.csv then gains `method` (newton | retrained) and `loss_change_if_removed_newton` (the estimate, kept for
comparison) after `loss_change_if_removed`, which holds the measured change where a retrain ran; `trusted` is
true for those rows. The summary's `group_retrain` block says what was decided and what was measured.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from ..cache import content_key
from ..groups import untrusted_groups
from ..retrain import RetrainResult, mean_test_loss, retrain_groups, torch_threads
from ..run import Run
from .verify import retrain_threads, shuffled_loader


def with_retrained(run: Run, frame: pd.DataFrame, groups: dict[str, np.ndarray], test_rows: list[int],
                   mean_ihvp: Callable[[], Tensor]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(groups.csv with `method` and `loss_change_if_removed_newton`, the summary's `group_retrain` block).
    mean_ihvp(): rank's H^-1 of the test rows' mean gradient (solved for group_effects), for each retrain's error."""
    setting, budget = run.cfg.rank.group_retrain, run.cfg.rank.group_retrain_budget
    frame = frame.copy()
    at = list(frame.columns).index("loss_change_if_removed") + 1
    frame.insert(at, "method", "newton")
    frame.insert(at + 1, "loss_change_if_removed_newton", frame["loss_change_if_removed"].to_numpy(dtype=float))
    info: dict[str, Any] = {"setting": setting, "retrained": [], "not_retrained": []}
    if setting is False:
        return frame, info
    wanted = [str(g) for g in frame["group"]] if setting is True else untrusted_groups(frame)
    if not wanted:
        return frame, info
    by_name = frame.set_index(frame["group"].astype(str))
    wanted.sort(key=lambda g: -abs(float(np.nan_to_num(by_name.loc[g, "loss_change_if_removed_newton"]))))
    keys = {g: _key(run, groups[g], test_rows) for g in wanted}
    measured = {g: stored for g in wanted if (stored := run.cache.get(keys[g])) is not None}
    todo = [g for g in wanted if g not in measured]
    if todo:
        measured.update(_retrain(run, todo, groups, test_rows, mean_ihvp(), keys,
                                 budget if setting == "auto" else None, info))
    info["not_retrained"] = [g for g in wanted if g not in measured]
    for g in wanted:
        if g in measured:
            row = frame.index[frame["group"].astype(str) == g][0]
            frame.loc[row, ["loss_change_if_removed", "method", "trusted"]] = [
                float(measured[g]["actual"]), "retrained", True]
            info["retrained"].append({"group": g, "seconds": float(measured[g]["seconds"]),
                                      "converged": bool(measured[g]["converged"]),
                                      "error_estimate": float(measured[g]["error"]), "reused": g not in todo})
    order = np.lexsort((np.arange(len(frame)), frame["loss_change_if_removed"].to_numpy(dtype=float)))
    return frame.iloc[order].reset_index(drop=True), info


def warning(frame: pd.DataFrame, info: dict[str, Any]) -> str | None:
    """One line naming the groups whose estimate is untrusted and unmeasured, and any retrain that stopped short."""
    lines = []
    if names := untrusted_groups(frame):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        why = ("rank.group_retrain is false" if info["setting"] is False else
               f"the retrains were priced over rank.group_retrain_budget ({info['budget_s']:.0f} s)")
        lines.append(f"groups.csv: the estimate for {len(names)} group(s) ({shown}) had not converged (their removal"
                     " moves the model far from the checkpoint, where the objective is not quadratic) and was not"
                     f" measured: {why}; measure them with `infl verify --groups`, or raise"
                     " rank.group_retrain_budget")
    unconverged = [r for r in info["retrained"] if not r["converged"]]
    changes = frame.set_index(frame["group"].astype(str))["loss_change_if_removed"] if unconverged else None
    if short := [r["group"] for r in unconverged
                 if not abs(r["error_estimate"]) <= 0.1 * abs(float(changes[r["group"]]))]:
        lines.append(f"groups.csv: the retrain without {', '.join(short[:5])} stopped above train.tol and its"
                     " estimated error is not small against the measured change: raise train.epochs or lower"
                     " train.tol")
    return "; ".join(lines) or None


def retrain_seconds(run: Run, budget: float = float("inf")) -> float:
    """The price of one group retrain, before any ran (also `infl check`'s): crossfit.estimate_seconds for one
    training with the recipe, an upper figure, since a retrain starts at the checkpoint."""
    from ..crossfit import estimate_seconds

    return estimate_seconds(run.cfg, run.train, run.problem.objective, run.device, run.dtype, 1, budget)


def _retrain(run: Run, todo: list[str], groups: dict[str, np.ndarray], test_rows: list[int], a: Tensor,
             keys: dict[str, str], budget: float | None, info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Retrain without the groups of `todo` in order (all of them, or while the next is priced within budget)."""
    run.end_split()  # torchrun: the other ranks are done; rank 0 retrains alone, over every row
    start = time.perf_counter()
    if budget is not None:
        with run.timer("group_retrain_estimate"):
            first = retrain_seconds(run, budget)
        info.update(budget_s=budget, estimated_s=float(first))
        if first > budget:
            return {}
    test_loss = mean_test_loss(run.problem.objective, run.stream(run.test, test_rows))  # type: ignore[arg-type]

    def go_on(done: list[RetrainResult]) -> bool:
        if budget is None:
            return True
        price = max([r.seconds for r in done], default=first)
        return time.perf_counter() - start + price <= budget

    with run.timer("group_retrain"), torch_threads(retrain_threads(run)):
        results = retrain_groups(run.problem, [groups[g] for g in todo], test_loss, run.cfg.train,
                                 run.phase("group retrains"), shuffled=shuffled_loader(run), test_ihvp_mean=a,
                                 go_on=go_on)
    out = {}
    for g, r in zip(todo, results, strict=False):
        out[g] = {"actual": r.actual_loss_change, "seconds": r.seconds, "converged": r.converged,
                  "error": r.actual_error}
        run.cache.put(keys[g], out[g])
    return out


def _key(run: Run, rows: np.ndarray, test_rows: list[int]) -> str:
    digest = hashlib.sha256(np.sort(np.asarray(rows, dtype=np.int64)).tobytes()).hexdigest()[:24]
    tests = hashlib.sha256(np.asarray(test_rows, dtype=np.int64).tobytes()).hexdigest()[:24]
    return "group-retrain-" + content_key({
        "base": run.base_key, "test": run.test.fingerprint, "test_rows": tests,  # type: ignore[union-attr]
        "rows": digest, "train": repr(run.cfg.train), "seed": run.cfg.seed, "batch_size": run.cfg.batch_size})
