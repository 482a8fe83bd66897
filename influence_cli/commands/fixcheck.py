"""`infl verify --fix fixes.csv`: does fixing the labels help? Retrain and measure.

Two retrains from the checkpoint with the `train:` recipe (retrain.py: the selected parameters,
warm-started): one on the training data as it is (the reference), one with the labels of
fixes.csv applied (or, with `remove`, without those rows). Test loss and accuracy of both, and the
paired bootstrap 95% interval of the change over the test rows (Koh & Liang's "check the top k%,
fix, retrain" loop). `--min-gain G` exits 1 when the accuracy gains less than G.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import CastLoader, LabeledDataset, Split, TensorRows, make_loader
from ..errors import ConfigError, DataError
from ..report import read_table
from ..retrain import retrain_groups, retrain_reference
from ..run import Report, Run

BOOTSTRAP = 2000


@dataclass(frozen=True)
class FixCheckOptions:
    fixes: Path
    remove: bool = False
    test_ids: tuple[str, ...] | None = None


def fix_check(run: Run, options: FixCheckOptions) -> Report:
    """Test loss and accuracy before and after applying fixes.csv, each with a retrain; see the module doc."""
    run.end_split()  # torchrun: nothing here is split (two retrains): rank 0 runs them, the other ranks end
    if run.cfg.task == "regression":
        raise ConfigError("--fix: task regression has no labels to fix")
    rows, new_labels = _read_fixes(run.train, options.fixes)
    test_rows = run.test_rows(options.test_ids)
    loader = run.stream(run.test, test_rows)  # type: ignore[arg-type]
    before, after = _Recorder(run, loader), _Recorder(run, loader)
    with run.timer("retrain"):
        reference = retrain_reference(run.problem, before, run.cfg.train)
        if options.remove:
            fixed = retrain_groups(run.problem, [rows], after, run.cfg.train, reference=reference)[0]
        else:
            relabeled = _relabeled(run.train, rows, new_labels)
            loader_fixed = CastLoader(make_loader(relabeled, run.cfg.batch_size), run.dtype)
            fixed = retrain_reference(replace(run.problem, train_loader=loader_fixed), after, run.cfg.train)
    summary: dict[str, Any] = {"command": "verify", "mode": "remove" if options.remove else "relabel",
                               "fixes": len(rows), "test_examples": len(test_rows),
                               "test_loss_before": before.loss.mean(), "test_loss_after": after.loss.mean(),
                               "accuracy_before": before.correct.mean(), "accuracy_after": after.correct.mean(),
                               "retrain_converged": bool(reference.converged and fixed.converged)}
    summary["accuracy_gain"] = summary["accuracy_after"] - summary["accuracy_before"]
    summary["test_loss_change"] = summary["test_loss_after"] - summary["test_loss_before"]
    rng = np.random.default_rng(run.cfg.seed)
    summary["accuracy_gain_ci95"] = _paired_interval(after.correct - before.correct, rng)
    summary["test_loss_change_ci95"] = _paired_interval(after.loss - before.loss, rng)
    test: Split = run.test  # type: ignore[assignment]
    table = pd.DataFrame({"test_id": np.asarray(test.ids, dtype=object)[test_rows],
                          "loss_before": before.loss, "loss_after": after.loss,
                          "correct_before": before.correct.astype(bool), "correct_after": after.correct.astype(bool)})
    if not (reference.converged and fixed.converged):
        run.warnings.append("a retrain stopped above train.tol: the before/after difference includes that error;"
                            " raise train.epochs")
    return run.finish(summary, {"fix_verify.csv": table})


class _Recorder:
    """The test loss function the retrains call: records per-row loss and correctness, returns the mean."""

    def __init__(self, run: Run, loader: Any) -> None:
        self.objective, self.loader = run.problem.objective, loader
        self.loss, self.correct = np.zeros(0), np.zeros(0)

    def __call__(self, model: torch.nn.Module) -> float:
        param = next(model.parameters())
        losses, correct = [], []
        with torch.no_grad():
            for _, x, y in self.loader:
                x = x.to(device=param.device, dtype=param.dtype if x.is_floating_point() else x.dtype)
                out, y = model(x), y.to(param.device)
                losses.append(self.objective.per_example_loss(out, y).double().cpu())
                predicted, _ = self.objective.predict(out, y)
                correct.append((predicted.reshape(-1) == y.reshape(-1).to(predicted.dtype)).double().cpu())
        self.loss, self.correct = torch.cat(losses).numpy(), torch.cat(correct).numpy()
        return float(self.loss.mean())


def _read_fixes(train: Split, path: Path) -> tuple[np.ndarray, list[str]]:
    """Training row numbers and their new labels (as report values) from fixes.csv."""
    frame = read_table(path, "--fix", ("id", "new_label"), "write it with `infl fix`")
    where = {i: r for r, i in enumerate(train.ids)}
    unknown = [i for i in frame["id"] if i not in where]
    if unknown:
        raise DataError(f"--fix: ids not in data.train: {', '.join(unknown[:5])}")
    return np.array([where[i] for i in frame["id"]], dtype=np.int64), frame["new_label"].tolist()


def _relabeled(train: Split, rows: np.ndarray, new_labels: list[str]) -> Split:
    """The split with the labels of `rows` replaced (names mapped through the split's classes)."""
    labels = train.labels.clone()
    names = {str(name): j for j, name in enumerate(train.classes)} if train.classes else None
    for row, value in zip(rows.tolist(), new_labels, strict=True):
        try:
            code = names[value] if names is not None else int(float(value))
        except (KeyError, ValueError):
            raise DataError(f"--fix: new_label {value!r} of row {train.ids[row]!r} is not a class of data.train") from None
        labels[row] = code
    dataset = train.dataset
    if isinstance(dataset, TensorRows):
        dataset = TensorRows(dataset.x, labels)
    elif isinstance(dataset, LabeledDataset):
        dataset = LabeledDataset(dataset.base, labels, dataset.ids, dataset.key)
    else:
        raise DataError("--fix: this data format cannot be relabeled in memory")
    return replace(train, labels=labels, dataset=dataset)


def _paired_interval(diff: np.ndarray, rng: np.random.Generator) -> list[float] | None:
    """Percentile bootstrap 95% interval of the mean of paired per-row differences (None below 3 rows)."""
    if len(diff) < 3:
        return None
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
