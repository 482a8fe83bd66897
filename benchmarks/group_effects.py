"""Benchmark: group influence (groups.csv) against retraining without each group, groups of 5-40% of the rows.

For each dataset and model (as in benchmarks/label_errors.py: logreg, and a tanh MLP that fits its noisy
labels), 10% of the training labels are flipped (uniform), and the rows are split into six disjoint groups:
`bad` (every flipped row plus clean rows up to 15% of n) and five random groups of the clean rest, of 5%,
10%, 15%, 20% and the remainder (~35%). A held-out 30% of the data (clean labels) is the test set.
Estimates: `influence_cli.groups.group_effects` with the direct solver: the Newton step (the default
`loss_change_if_removed`), the first-order sum (`_1st`) and the second-order expansion (`_2nd`). Actual:
float64 L-BFGS retraining without the group, warm-started from the checkpoint, to a gradient norm < 1e-7.
`default` is what `infl rank` writes by default (rank.group_retrain: auto): the Newton estimate, and for the
groups it marks untrusted the retrained change (rank retrains them as this script does; the time those retrains
took is printed). Printed per cell: Pearson of each estimate with the actual effects, whether every effect larger than 10%
of the largest has the right sign, the ratio estimate/actual of the largest effect, and whether `bad` is
ranked most harmful (and is most harmful in fact).

Development only (needs what label_errors.py needs). From the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/group_effects.py [--datasets digits,wine] [--models logreg,mlp]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from label_errors import MODELS, Rows, add_noise, load_dataset  # noqa: E402

from influence_cli.config import ModelConfig, TrainConfig  # noqa: E402
from influence_cli.gradients import GradientSource  # noqa: E402
from influence_cli.groups import group_effects, mean_loss_change, mean_loss_hvp  # noqa: E402
from influence_cli.models import build_model  # noqa: E402
from influence_cli.objective import Objective, ParamSpace, Problem  # noqa: E402
from influence_cli.solvers import make_solver  # noqa: E402
from influence_cli.train import minimize  # noqa: E402

ESTIMATES = {"newton": "loss_change_if_removed", "first": "loss_change_if_removed_1st",
             "second": "loss_change_if_removed_2nd"}
SHOWN = ("default", *ESTIMATES)


def make_groups(flipped: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(flipped)
    clean = rng.permutation(np.flatnonzero(~flipped))
    extra = max(0, round(0.15 * n) - int(flipped.sum()))
    groups = {"bad": np.sort(np.concatenate([np.flatnonzero(flipped), clean[:extra]]))}
    rest = clean[extra:]
    cuts = np.cumsum([0] + [round(f * n) for f in (0.05, 0.10, 0.15, 0.20)])
    for k, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        groups[f"g{k + 1}"] = np.sort(rest[lo:hi])
    groups["g5"] = np.sort(rest[cuts[-1]:])
    return groups


def cell(name: str, model: str, seed: int = 0) -> dict[str, object]:
    x, y = load_dataset(name)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cut = round(0.7 * len(y))
    tr, te = order[:cut], order[cut:]
    classes = int(y.max()) + 1
    noisy, flipped = add_noise(y[tr], classes, 0.1, "uniform", seed)
    wd, hidden, solver_cfg = MODELS[model]
    task = "binary" if classes == 2 else "classification"
    kwargs = {"in_features": int(x.shape[1]), "num_classes": 1 if task == "binary" else classes}
    if hidden:
        kwargs |= {"hidden": [hidden], "activation": "tanh"}
    torch.manual_seed(seed)
    net = build_model(ModelConfig(arch=model, kwargs=kwargs)).double().eval()

    def target(v: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(v, dtype=torch.float64) if task == "binary" else torch.as_tensor(v)

    xt, yt = torch.as_tensor(x[tr]), target(noisy)
    xs, ys = torch.as_tensor(x[te]), target(y[te])
    problem = Problem(model=net, objective=Objective(task, wd), params=ParamSpace.select(net, "all"),
                      train_loader=Rows(xt, yt), n=len(tr), damping=solver_cfg.damping, hessian=solver_cfg.hessian)
    params = list(net.parameters())
    exact = TrainConfig(optimizer="lbfgs", epochs=5000 if hidden else 2000, tol=1e-8)
    minimize(net, params, problem.objective, problem.train_loader, len(tr), exact)
    net.requires_grad_(False)

    def test_loss() -> float:
        with torch.no_grad():
            return float(problem.objective.per_example_loss(net(xs), ys).mean())

    groups = make_groups(flipped, seed)
    start = time.perf_counter()
    solver = make_solver(solver_cfg).fit(problem)
    test_problem = Problem(model=net, objective=problem.objective, params=problem.params,
                           train_loader=Rows(xs, ys), n=len(te), damping=0.0)
    gbar = torch.cat([b.grads for b in GradientSource(test_problem).per_example(Rows(xs, ys))]).mean(0)
    a = solver.ihvp(gbar[None].double())
    source = GradientSource(problem)
    frame = group_effects(problem, solver, a, groups, lambda: source.per_example(problem.train_loader),
                          test_hvp=mean_loss_hvp(problem, Rows(xs, ys), len(te)),
                          test_loss_change=mean_loss_change(problem, Rows(xs, ys), len(te))).set_index("group")
    seconds = time.perf_counter() - start
    base, theta = test_loss(), [p.detach().clone() for p in params]
    actual, retrain_seconds = {}, {}
    for g, rows in groups.items():
        began = time.perf_counter()
        exclude = torch.zeros(len(tr), dtype=torch.bool)
        exclude[torch.as_tensor(rows)] = True
        net.requires_grad_(True)
        minimize(net, params, problem.objective, problem.train_loader, len(tr), exact, exclude=exclude)
        net.requires_grad_(False)
        actual[g] = test_loss() - base
        retrain_seconds[g] = time.perf_counter() - began
        with torch.no_grad():
            for p, t in zip(params, theta, strict=True):
                p.copy_(t)
    act = np.array([actual[g] for g in frame.index])
    out: dict[str, object] = {"dataset": name, "model": model, "n": len(tr), "seconds": seconds}
    big = np.abs(act) > 0.1 * np.abs(act).max()
    top = int(np.argmax(np.abs(act)))
    untrusted = np.array([t is not None and not bool(t) for t in frame["trusted"]])
    estimates = {short: frame[column].to_numpy(dtype=float) for short, column in ESTIMATES.items()}
    # what rank writes by default (rank.group_retrain: auto): the Newton estimate, measured by retraining where it
    # is not trusted (the retrain here is rank's: L-BFGS from the checkpoint without the group)
    estimates["default"] = np.where(untrusted, act, estimates["newton"])
    for short, est in estimates.items():
        out[f"{short}_pearson"] = float(np.corrcoef(est, act)[0, 1])
        out[f"{short}_signs"] = bool(np.all(np.sign(est[big]) == np.sign(act[big])))
        out[f"{short}_largest"] = float(est[top] / act[top])
        out[f"{short}_bad_first"] = frame.index[int(np.argmin(est))] == "bad"
    out["bad_most_harmful_actual"] = frame.index[int(np.argmin(act))] == "bad"
    out["untrusted"] = [g for g, t in frame["trusted"].items() if t is not None and not bool(t)]
    out["retrain_seconds"] = float(sum(retrain_seconds[g] for g in out["untrusted"]))
    sizes = {g: len(groups[g]) / len(tr) for g in frame.index}
    out["by_size"] = ", ".join(f"{g} {sizes[g]:.0%}: {e:+.4f}/{a:+.4f}" for g, e, a in sorted(
        zip(frame.index, estimates["newton"], act, strict=True), key=lambda t: sizes[t[0]]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="digits,breast_cancer,wine,iris,penguins,anes96")
    parser.add_argument("--models", default="logreg,mlp")
    args = parser.parse_args()
    rows = []
    for name in args.datasets.split(","):
        for model in args.models.split(","):
            r = cell(name, model)
            rows.append(r)
            print(f"{name:14s} {model:6s} n={r['n']:5d} " + "  ".join(
                f"{k}: r={r[k + '_pearson']:+.3f} signs={'ok' if r[k + '_signs'] else 'NO'}"
                f" largest={r[k + '_largest']:.2f} bad1st={'y' if r[k + '_bad_first'] else 'n'}" for k in SHOWN)
                + f"  (bad most harmful in fact: {'y' if r['bad_most_harmful_actual'] else 'n'};"
                  f" untrusted {r['untrusted']}, their retrains {r['retrain_seconds']:.1f} s; estimates"
                  f" {r['seconds']:.1f} s)", flush=True)
            print(f"{'':22s} Newton/actual per group, by size: {r['by_size']}", flush=True)
    for k in SHOWN:
        pear = np.array([r[k + "_pearson"] for r in rows])
        print(f"{k:7s} Pearson median {np.median(pear):.3f} min {pear.min():.3f}; signs right in "
              f"{sum(r[k + '_signs'] for r in rows)}/{len(rows)}; largest within 2x in "
              f"{sum(0.5 <= r[k + '_largest'] <= 2 for r in rows)}/{len(rows)}; bad first in "
              f"{sum(r[k + '_bad_first'] for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
