"""Benchmark: which per-row signal finds flipped labels best (issue 4, item 4).

For each sample dataset (10% of training labels flipped, answer_key.csv says which), trains a
logistic regression (or, with --model mlp, a one-hidden-layer tanh MLP that can memorize labels)
with `infl`'s own pipeline (`pipeline.train`: L-BFGS to convergence, float64, configs written to a
temporary folder), fits the direct solver, and ranks the training rows by each signal:

- self_influence  g^T H^-1 g (selfcheck's default ranking)
- loss            the training loss
- loo_loss_1st    loss + self_influence / n (first-order leave-one-out loss)
- loo_loss        the Newton / Sherman-Morrison leave-one-out loss (influence_cli.signals.loo_loss)
- cleanlab        confident learning's self-confidence score from 5-fold out-of-fold probabilities of
                  the same kind of sklearn model with the matching L2 strength (LogisticRegression
                  C = 1 / (n_fit * wd); MLPClassifier alpha = wd * n_fit), if cleanlab is installed
                  (a development extra: `pip install cleanlab`)

and prints a markdown table of recall at 5/10/20% of rows inspected, AUROC and average precision.
Development only (needs scikit-learn). Run from the repository root:

    .venv/bin/python benchmarks/label_errors.py [--weight-decay 1e-3] [--datasets digits,breast_cancer,wine]
        [--model logreg|mlp --hidden 64]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence_cli import pipeline  # noqa: E402
from influence_cli.config import load_config  # noqa: E402
from influence_cli.data import make_loader  # noqa: E402
from influence_cli.gradients import GradientSource  # noqa: E402
from influence_cli.groups import group_effects, mean_loss_hvp  # noqa: E402
from influence_cli.signals import loo_loss  # noqa: E402
from influence_cli.solvers import make_solver  # noqa: E402
from influence_cli.verify import mean_test_loss, retrain_groups  # noqa: E402

DATASETS = {  # name: (task, features, outputs, carry)
    "digits": ("classification", 64, 10, ["source"]),
    "breast_cancer": ("binary", 30, 1, []),
    "wine": ("classification", 13, 3, []),
}
FRACTIONS = (0.05, 0.10, 0.20)


def write_config(name: str, weight_decay: float, workdir: Path, model: str = "logreg", hidden: int = 64) -> Path:
    task, features, outputs, carry = DATASETS[name]
    kwargs = {"in_features": features, "num_classes": outputs}
    if model == "mlp":  # tanh: smooth, so L-BFGS converges and the Hessian exists everywhere
        kwargs |= {"hidden": [hidden], "activation": "tanh"}
    data = ROOT / "sample_data" / name
    split = {"format": "csv", "label": "label", "id": "id", "carry": carry}
    cfg = {
        "seed": 0, "device": "cpu", "dtype": "float64", "batch_size": 512, "task": task, "params": "all",
        "weight_decay": weight_decay,
        "model": {"arch": model, "kwargs": kwargs, "checkpoint": str(workdir / f"{name}.pt")},
        "data": {"train": {**split, "path": str(data / "train.csv")}, "test": {**split, "path": str(data / "test.csv")}},
        # an MLP's exact Hessian is indefinite: its Gauss-Newton form with a little damping is not
        "solver": ({"name": "direct", "damping": 0.0} if model == "logreg"
                   else {"name": "direct", "damping": 1e-3, "hessian": "gauss_newton"}),
        "train": {"optimizer": "lbfgs", "epochs": 3000 if model == "mlp" else 1000, "lr": 1.0, "tol": 1e-7},
        "output": {"dir": str(workdir / name)},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def influence_signals(config: Path) -> tuple[list[str], dict[str, np.ndarray], dict[str, float]]:
    cfg = load_config(config)
    trained = pipeline.train(cfg)
    inp = pipeline.load_inputs(cfg)
    solver = make_solver(cfg.solver).fit(inp.problem)
    res = loo_loss(inp.problem, solver)
    signals = {"self_influence": res.self_influence, "loss": res.loss, "loo_loss_1st": res.loo_loss_first_order,
               "loo_loss": res.loo_loss}
    info = {"grad_norm": trained.summary["grad_norm"], "capped": res.capped, "leverage_max": float(res.leverage.max())}
    return list(inp.train.ids), signals, info


def group_check(name: str, config: Path, truth: np.ndarray) -> list[str]:
    """A "bad annotator" group holding every flipped row plus 5% of the clean rows, the other clean
    rows split at random into 4 groups: groups.csv's first- and second-order estimates of the mean
    test loss change against retraining without each group (verify.retrain_groups). Table rows."""
    cfg = load_config(config)
    inp = pipeline.load_inputs(cfg, need_test=True)
    problem, source = inp.problem, GradientSource(inp.problem)
    solver = make_solver(cfg.solver).fit(problem)
    test_loader = pipeline._Cast(make_loader(inp.test, cfg.batch_size), torch.float64)
    gbar = torch.cat([b.grads.double() for b in source.per_example(test_loader)]).mean(0)
    a = solver.ihvp(gbar[None])
    clean = np.random.default_rng(0).permutation(np.flatnonzero(~truth))
    extra = round(0.05 * len(truth))
    groups = {"bad": np.sort(np.r_[np.flatnonzero(truth), clean[:extra]])}
    groups |= {f"random{k}": np.sort(part) for k, part in enumerate(np.array_split(clean[extra:], 4))}
    frame = group_effects(problem, solver, a, groups, lambda: source.per_example(problem.train_loader),
                          test_hvp=mean_loss_hvp(problem, test_loader, inp.test.n))
    results = retrain_groups(problem, [groups[g] for g in frame.group], mean_test_loss(problem.objective, test_loader),
                             cfg.train, test_ihvp_mean=a[0])
    rows = []
    for (_, row), res in zip(frame.iterrows(), results, strict=True):
        actual, first, second = res.actual_loss_change, row.loss_change_if_removed, row.loss_change_if_removed_2nd
        rows.append(f"| {name} | {row.group} | {row['size']} ({truth[groups[row.group]].sum()} flipped) | {first:.4f} "
                    f"| {second:.4f} | {actual:.4f} | {abs(first - actual):.4f} | {abs(second - actual):.4f} |")
    return rows


def cleanlab_signal(name: str, weight_decay: float, model: str = "logreg", hidden: int = 64,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(suspicion score, flagged mask) from cleanlab on 5-fold out-of-fold probabilities of the same
    kind of model with the same L2 strength (sklearn penalizes weights, not biases); None without cleanlab."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        return None
    frame = pd.read_csv(ROOT / "sample_data" / name / "train.csv")
    x = frame[[c for c in frame.columns if c not in ("id", "label", "source")]].to_numpy(np.float64)
    y = frame["label"].to_numpy()
    classes = int(y.max()) + 1
    probs = np.zeros((len(y), classes))
    for fit, held in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        if model == "mlp":  # alpha ||W||^2 / (2 n_fit) = 0.5 wd ||W||^2
            clf = MLPClassifier((hidden,), activation="tanh", solver="lbfgs", alpha=weight_decay * len(fit),
                                max_iter=3000, random_state=seed)
        else:
            clf = LogisticRegression(C=1.0 / (len(fit) * weight_decay), max_iter=5000)
        clf.fit(x[fit], y[fit])
        probs[held] = clf.predict_proba(x[held])
    quality = get_label_quality_scores(y, probs, method="self_confidence")
    flagged = find_label_issues(y, probs)
    return -quality, flagged


def metrics(score: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    order = np.lexsort((np.arange(len(score)), -score))
    out = {}
    for f in FRACTIONS:
        top = order[: math.ceil(f * len(score))]
        out[f"recall@{int(f * 100)}%"] = truth[top].sum() / truth.sum()
    out["AUROC"] = roc_auc_score(truth, score)
    out["AP"] = average_precision_score(truth, score)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--model", choices=["logreg", "mlp"], default="logreg",
                        help="mlp: one tanh hidden layer (--hidden units), which can memorize flipped labels")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--groups", action="store_true",
                        help="also check group influence on a group holding every flipped row (retrains 5 groups)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| dataset | signal | " + " | ".join([f"recall@{int(f * 100)}%" for f in FRACTIONS] + ["AUROC", "AP"]) + " |",
             "|---|---|" + "---|" * (len(FRACTIONS) + 2)]
    notes = []
    group_lines = ["| dataset | group (sorted as groups.csv) | size | 1st order | 2nd order | retrained | "
                   "1st error | 2nd error |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="infl_label_errors_") as tmp:
        for name in args.datasets.split(","):
            config = write_config(name, args.weight_decay, Path(tmp), args.model, args.hidden)
            ids, signals, info = influence_signals(config)
            key = pd.read_csv(ROOT / "sample_data" / name / "answer_key.csv").set_index("id")
            truth = key.loc[ids, "flipped"].to_numpy().astype(bool)
            clean = cleanlab_signal(name, args.weight_decay, args.model, args.hidden)
            if clean is not None:
                signals["cleanlab (CL, 5-fold)"] = clean[0]
                flagged = clean[1]
                notes.append(f"{name}: cleanlab find_label_issues flags {flagged.sum()} rows, precision "
                             f"{truth[flagged].mean():.3f}, recall {truth[flagged].sum() / truth.sum():.3f}")
            notes.append(f"{name}: n={len(ids)}, flipped={truth.sum()}, train grad norm {info['grad_norm']:.2g}, "
                         f"max leverage {info['leverage_max']:.3f}, capped {info['capped']}, "
                         f"mean training loss of flipped rows {signals['loss'][truth].mean():.3g}, "
                         f"of clean rows {signals['loss'][~truth].mean():.3g}")
            for signal, score in signals.items():
                m = metrics(np.asarray(score), truth)
                lines.append(f"| {name} | {signal} | " + " | ".join(f"{v:.3f}" for v in m.values()) + " |")
            if args.groups:
                group_lines += group_check(name, config, truth)
    model = "logistic regression, damping 0, exact Hessian" if args.model == "logreg" else (
        f"MLP (1 tanh layer of {args.hidden}), damping 1e-3, Gauss-Newton Hessian")
    print(f"{model}, weight_decay = {args.weight_decay:g}, direct solver\n")
    print("\n".join(lines))
    print()
    print("\n".join(f"- {note}" for note in notes))
    if args.groups:
        print("\nGroup influence on the mean test loss (groups.csv estimates vs retraining without the group):\n")
        print("\n".join(group_lines))


if __name__ == "__main__":
    main()
