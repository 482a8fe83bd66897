"""Benchmark: which per-row score finds flipped labels best, and are `flagged` and the error-rate estimate calibrated.

Datasets (all shipped offline; nothing is downloaded at run time):

- digits, breast_cancer, wine: sample_data/ (scikit-learn's bundled copies), clean labels from answer_key.csv
- iris: scikit-learn (`load_iris`)
- penguins: the `palmerpenguins` package (species from 4 measurements + island + sex, rows with NaN dropped)
- anes96: statsmodels (`statsmodels.datasets.anes96`: the vote, Clinton 0 / Dole 1, a binary task)

Each cell takes the clean training labels, flips exactly round(rate * n) of them (rate 10% or 20%):
`uniform` (to a class drawn uniformly among the others) or `classcond` (class k to class k+1 mod C;
for a binary task, class-conditional = asymmetric: only rows of the larger class are flipped), then
trains the model on the noisy labels with `infl`'s own leaf modules (float64 L-BFGS to convergence),
fits the direct solver and runs `signals.loo_loss` (the Newton leave-one-out outputs):

- logreg: (multinomial / binary) logistic regression, weight_decay 1e-3, exact Hessian, damping 0
- mlp: one tanh hidden layer of 32 units, weight_decay 1e-4 (it fits most flipped labels),
  Gauss-Newton Hessian, damping 1e-3

Scores compared (higher = more suspect): `loss`, `self_influence`, `cleanlab` (confident learning's
self-confidence from 5-fold out-of-fold probabilities of the matching sklearn model with the same L2:
cleanlab.rank.get_label_quality_scores; its flags from cleanlab.filter.find_label_issues) and
`suspicion` (influence_cli.suspicion.suspicion, from one fit's Newton leave-one-out, the training loss's rank
weighted 0.8) and `default` (what
`infl selfcheck` ranks by by default: the same, except for a model that memorized its labels by selfcheck's
test, which `selfcheck.cross_fit: auto` audits from 5 out-of-fold fits: rank_mean(loss, oof_loss, oof_margin);
the `audit` column says which). Metrics: recall of flips in the top 10% / 20% of rows and average precision
("suspicion - best", "default - best": the smallest of the three differences to the best of loss /
self_influence / cleanlab, >= -0.01 is the target); flags (the default's: confident learning on the Newton
leave-one-out probabilities, or on the temperature-scaled out-of-fold ones, for the count; the rows are the top of
`default`, suspicion.flag_most_suspect): count vs true flips, precision,
and the flagged fraction when the same model is trained on the clean labels. Development only (needs scikit-learn, cleanlab, statsmodels,
palmerpenguins: `pip install cleanlab statsmodels palmerpenguins`). From the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_errors.py [--datasets digits,wine] [--models logreg]
        [--rates 0.1,0.2] [--kinds uniform,classcond] [--cache DIR]

--cache keeps each cell's arrays (npz) so a rerun only rescores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence_cli.commands.selfcheck import MEMORIZED_ACCURACY, MEMORIZED_LOSS  # noqa: E402
from influence_cli.config import ModelConfig, SolverConfig, TrainConfig  # noqa: E402
from influence_cli.models import build_model  # noqa: E402
from influence_cli.objective import Objective, ParamSpace, Problem  # noqa: E402
from influence_cli.signals import loo_loss  # noqa: E402
from influence_cli.solvers import make_solver  # noqa: E402
from influence_cli.suspicion import (  # noqa: E402
    ONE_FIT_LOSS_WEIGHT,
    class_probs,
    fit_temperature,
    flag_errors,
    flag_most_suspect,
    label_margin,
    suspicion,
)
from influence_cli.train import minimize  # noqa: E402

DATASETS = ("digits", "breast_cancer", "wine", "iris", "penguins", "anes96")
MODELS = {  # name: (weight_decay, hidden, solver config)
    "logreg": (1e-3, None, SolverConfig(name="direct", damping=0.0)),
    "mlp": (1e-4, 32, SolverConfig(name="direct", damping=1e-3, hessian="gauss_newton")),
}
SIGNALS = ("loss", "self_influence", "cleanlab", "suspicion", "default")


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, d) float64 z-scored, clean labels (n,) int64 in 0..C-1)."""
    if name in ("digits", "breast_cancer", "wine"):
        frame = pd.read_csv(ROOT / "sample_data" / name / "train.csv")
        key = pd.read_csv(ROOT / "sample_data" / name / "answer_key.csv").set_index("id")
        x = frame[[c for c in frame.columns if c not in ("id", "label", "source")]].to_numpy(np.float64)
        y = key.loc[frame["id"], "true_label"].to_numpy()
    elif name == "iris":
        from sklearn.datasets import load_iris

        x, y = load_iris(return_X_y=True)
    elif name == "penguins":
        import palmerpenguins

        df = palmerpenguins.load_penguins().dropna()
        num = df[["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]]
        x = pd.concat([num, pd.get_dummies(df[["island", "sex"]], dtype=float)], axis=1).to_numpy(np.float64)
        y = pd.Categorical(df["species"]).codes
    elif name == "anes96":
        import statsmodels.api as sm

        df = sm.datasets.anes96.load_pandas().data
        x = df[["popul", "TVnews", "selfLR", "ClinLR", "DoleLR", "PID", "age", "educ", "income"]].to_numpy(np.float64)
        y = df["vote"].to_numpy()
    else:
        raise SystemExit(f"unknown dataset {name}")
    x = np.asarray(x, dtype=np.float64)
    std = x.std(0)
    x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    return x, np.asarray(y, dtype=np.int64)


def add_noise(y: np.ndarray, classes: int, rate: float, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): exactly round(rate * n) rows flipped (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(y))
    if kind == "classcond" and classes == 2:
        pool = np.flatnonzero(y == np.bincount(y).argmax())
    rows = rng.choice(pool, size=round(rate * len(y)), replace=False)
    noisy = y.copy()
    if kind == "uniform":
        noisy[rows] = (y[rows] + rng.integers(1, classes, size=len(rows))) % classes
    else:
        noisy[rows] = (y[rows] + 1) % classes
    return noisy, noisy != y


class Rows:
    """Re-iterable (row_idx, x, y) batches over in-memory tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        for s in range(0, len(self.x), self.batch_size):
            idx = torch.arange(s, min(s + self.batch_size, len(self.x)))
            yield idx, self.x[idx], self.y[idx]


def influence_cell(x: np.ndarray, y: np.ndarray, classes: int, model: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Train on (x, y), fit the direct solver, run loo_loss: loss, self_influence, outputs, loo_outputs."""
    wd, hidden, solver_cfg = MODELS[model]
    task = "binary" if classes == 2 else "classification"
    width = 1 if task == "binary" else classes
    kwargs = {"in_features": int(x.shape[1]), "num_classes": int(width)}
    if hidden:
        kwargs |= {"hidden": [hidden], "activation": "tanh"}
    torch.manual_seed(seed)
    net = build_model(ModelConfig(arch=model, kwargs=kwargs)).double().eval()
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y, dtype=torch.float64) if task == "binary" else torch.as_tensor(y)
    problem = Problem(model=net, objective=Objective(task, wd), params=ParamSpace.select(net, "all"),
                      train_loader=Rows(xt, yt), n=len(y), damping=solver_cfg.damping, hessian=solver_cfg.hessian)
    params = list(net.parameters())
    result = minimize(net, params, problem.objective, problem.train_loader, len(y),
                      TrainConfig(optimizer="lbfgs", epochs=5000 if hidden else 1000, tol=1e-7))
    net.requires_grad_(False)
    solver = make_solver(solver_cfg).fit(problem)
    res = loo_loss(problem, solver)
    return {"loss": res.loss, "self_influence": res.self_influence, "loo_loss": res.loo_loss, "outputs": res.outputs,
            "loo_outputs": res.loo_outputs, "leverage": res.leverage, "grad_norm": np.array(result.grad_norm)}


def oof_outputs(x: np.ndarray, y: np.ndarray, classes: int, model: str, folds: int = 5, seed: int = 0) -> np.ndarray:
    """(n, C) out-of-fold outputs, as `selfcheck --cross-fit` computes them (crossfit.py): for each of `folds`
    stratified folds a fresh model trained as influence_cell trains on the other rows, its outputs on the fold."""
    wd, hidden, _ = MODELS[model]
    task = "binary" if classes == 2 else "classification"
    width = 1 if task == "binary" else classes
    kwargs = {"in_features": int(x.shape[1]), "num_classes": int(width)}
    if hidden:
        kwargs |= {"hidden": [hidden], "activation": "tanh"}
    out = np.zeros((len(y), width))
    for k, (fit, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)):
        torch.manual_seed(seed + k)
        net = build_model(ModelConfig(arch=model, kwargs=kwargs)).double().eval()
        yt = torch.as_tensor(y[fit], dtype=torch.float64) if task == "binary" else torch.as_tensor(y[fit])
        minimize(net, list(net.parameters()), Objective(task, wd), Rows(torch.as_tensor(x[fit]), yt), len(fit),
                 TrainConfig(optimizer="lbfgs", epochs=5000 if hidden else 1000, tol=1e-7))
        with torch.no_grad():
            out[held] = net(torch.as_tensor(x[held])).numpy().reshape(len(held), -1)
    return out


def memorized(c: dict[str, np.ndarray]) -> bool:
    """selfcheck's test (commands/selfcheck.py): mean training loss under MEMORIZED_LOSS or MEMORIZED_ACCURACY of
    the given labels predicted; such a model is audited from out-of-fold fits by default (selfcheck.cross_fit)."""
    probs = class_probs(c["outputs"])
    accuracy = float((probs.argmax(1) == c["labels"]).mean())
    return float(c["loss"].mean()) < MEMORIZED_LOSS or accuracy >= MEMORIZED_ACCURACY


def default_audit(c: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, object]:
    """(suspicion, probabilities, flags) as `infl selfcheck` computes them by default: from the out-of-fold
    outputs (flags on temperature-scaled ones) when the model memorized, else from the Newton leave-one-out."""
    y = c["labels"]
    if "oof_outputs" not in c:
        probs = class_probs(c["loo_outputs"])
        loo = c["loo_loss"] if "loo_loss" in c else -np.log(probs[np.arange(len(probs)), y])
        score = suspicion(c["loss"], loo, label_margin(probs, y), ONE_FIT_LOSS_WEIGHT)
        return score, probs, flag_most_suspect(flag_errors(y, probs), score, y, probs)
    o = c["oof_outputs"]
    probs = class_probs(o)
    oof_loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-300, None))
    scaled = class_probs(o / fit_temperature(o, y))
    score = suspicion(c["loss"], oof_loss, label_margin(probs, y))
    return score, probs, flag_most_suspect(flag_errors(y, scaled), score, y, scaled)


def cleanlab_cell(x: np.ndarray, y: np.ndarray, model: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Confident learning (cleanlab) on 5-fold out-of-fold probabilities of the matching sklearn model."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    wd, hidden, _ = MODELS[model]
    classes = int(y.max()) + 1
    probs = np.zeros((len(y), classes))
    for fit, held in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        if hidden:  # sklearn: alpha ||W||^2 / (2 n_fit) = 0.5 wd ||W||^2
            clf = MLPClassifier((hidden,), activation="tanh", solver="lbfgs", alpha=wd * len(fit),
                                max_iter=3000, random_state=seed)
        else:
            clf = LogisticRegression(C=1.0 / (len(fit) * wd), max_iter=5000)
        clf.fit(x[fit], y[fit])
        probs[held] = clf.predict_proba(x[held])
    return {"cl_score": -get_label_quality_scores(y, probs), "cl_flagged": find_label_issues(y, probs),
            "cl_probs": probs}


def cell(args: argparse.Namespace, name: str, model: str, rate: float, kind: str, draw: int = 0) -> dict[str, np.ndarray]:
    """Every array of one cell, from --cache when there; rate 0 = the clean labels; `draw` picks the noise draw
    (draw 0 is the seed every earlier table used; draw d > 0 adds 10,000 d to it)."""
    suffix = f"_d{draw}" if draw else ""
    path = None if args.cache is None else Path(args.cache) / f"{name}_{model}_{rate:g}_{kind}{suffix}.npz"
    stored = dict(np.load(path)) if path is not None and path.exists() else None
    if stored is not None and ("oof_outputs" in stored or not memorized(stored)):
        return stored
    x, clean = load_dataset(name)
    classes = int(clean.max()) + 1
    if stored is not None:  # cached before the memorization test changed: add the out-of-fold outputs it now needs
        stored["oof_outputs"] = oof_outputs(x, stored["labels"], classes, model)
        np.savez(path, **stored)
        return stored
    seed = int(1000 * rate) + (7 if kind == "classcond" else 0) + 10_000 * draw
    y, flipped = (clean, np.zeros(len(clean), bool)) if rate == 0 else add_noise(clean, classes, rate, kind, seed)
    out = {"labels": y, "flipped": flipped, **influence_cell(x, y, classes, model)}
    if memorized(out):
        out["oof_outputs"] = oof_outputs(x, y, classes, model)
    if rate > 0:
        out |= cleanlab_cell(x, y, model)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out


def scores(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The four compared scores of a cell (higher = more suspect)."""
    probs = class_probs(c["loo_outputs"])
    loo = c["loo_loss"] if "loo_loss" in c else -np.log(probs[np.arange(len(probs)), c["labels"]])
    return {"loss": c["loss"], "self_influence": c["self_influence"], "cleanlab": c["cl_score"],
            "suspicion": suspicion(c["loss"], loo, label_margin(probs, c["labels"]), ONE_FIT_LOSS_WEIGHT),
            "default": default_audit(c)[0]}


def metrics(score: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    order = np.lexsort((np.arange(len(score)), -score))
    recall = [truth[order[: int(np.ceil(f * len(score)))]].sum() / truth.sum() for f in (0.1, 0.2)]
    return recall[0], recall[1], average_precision_score(truth, score)


def row(args: argparse.Namespace, name: str, model: str, rate: float, kind: str, draws: list[int],
        clean_rate: float) -> str:
    """One table row: every figure is the mean over the noise draws (flag counts summed, precision pooled)."""
    measured, gaps, flagged, flips, hits, cl_flagged, cl_hits, est, low, high, audits = \
        [], [], 0, 0, 0, 0, 0, [], [], [], set()
    for draw in draws:
        c = cell(args, name, model, rate, kind, draw)
        truth = c["flipped"]
        m = {k: np.array(metrics(np.asarray(v), truth)) for k, v in scores(c).items()}
        measured.append(m)
        gaps.append(np.min(m["default"] - np.max([m[k] for k in SIGNALS[:3]], axis=0)))
        flags = default_audit(c)[2]
        f, cl = flags.flagged, c["cl_flagged"]
        flagged, flips, hits = flagged + int(f.sum()), flips + int(truth.sum()), hits + int(truth[f].sum())
        cl_flagged, cl_hits = cl_flagged + int(cl.sum()), cl_hits + int(truth[cl].sum())
        est.append(flags.error_rate), low.append(flags.interval[0]), high.append(flags.interval[1])
        audits.add("cross-fit" if "oof_outputs" in c else "one fit")
    mean = {k: np.mean([m[k] for m in measured], axis=0) for k in SIGNALS}
    best = np.max([mean[k] for k in SIGNALS[:3]], axis=0)
    cols = [" / ".join(f"{v:.3f}" for v in mean[k]) for k in SIGNALS]
    cols += [f"{np.min(mean['suspicion'] - best):+.3f}", f"{np.min(mean['default'] - best):+.3f}", "/".join(sorted(audits))]
    n = len(draws)
    text = (f"| {name} | {model} | {rate:.0%} | {kind} | " + " | ".join(cols)
            + f" | {flagged / n:g} / {flips / n:g} | {hits / flagged if flagged else float('nan'):.3f} "
            f"| {cl_flagged / n:g} ({cl_hits / cl_flagged if cl_flagged else float('nan'):.3f}) "
            f"| {np.mean(est):.3f} [{np.mean(low):.3f}, {np.mean(high):.3f}] | {clean_rate:.3f} |")
    return text + (f" {min(gaps):+.3f} |" if n > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rates", default="0.1,0.2")
    parser.add_argument("--kinds", default="uniform,classcond")
    parser.add_argument("--cache", default=None, help="folder for each cell's arrays (npz); reruns only rescore")
    parser.add_argument("--draws", default="0",
                        help="noise draws, e.g. 0,1,2: each cell's figures are the mean over them (0 = the single "
                             "draw of the earlier tables)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    draws = [int(d) for d in args.draws.split(",")]
    head = "| dataset | model | noise | kind | " + " | ".join(
        f"{s} r@10 / r@20 / AP" for s in SIGNALS) + " | suspicion - best | default - best | audit | flagged / flips " \
        "| flag precision | CL flagged (prec.) | est. rate [90% int.] | clean-data flag rate |"
    if len(draws) > 1:
        head += " default - best, worst draw |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    start = time.perf_counter()
    for name in args.datasets.split(","):
        for model in args.models.split(","):
            clean = cell(args, name, model, 0.0, "none")
            clean_flags = default_audit(clean)[2]
            for rate in map(float, args.rates.split(",")):
                for kind in args.kinds.split(","):
                    lines.append(row(args, name, model, rate, kind, draws, clean_flags.flagged.mean()))
                    print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
