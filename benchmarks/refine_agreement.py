"""What `refine` buys per solver and model size: train->test agreement with the exact (direct) solve, and its cost.

For each digits tanh MLP 64-H-10 (weight decay 0.01, float64 L-BFGS to a gradient norm < 1e-5, trained here
into --work by `api.train`, the code behind `infl train`), takes --test-rows test rows and every training row and
compares `loss_change_if_removed` (g_z^T A^-1 g_t / n, what `infl rank` writes) under each solver with direct's:
the Spearman per test row (mean and min over the test rows) and of the mean over test rows (overall.csv), for
ekfac and arnoldi at refine 0/1/2/4/8 (fitted once; each refine level reloads the fitted state), cg at its
defaults and lissa at its defaults. Cost: HVP passes of the ihvp call and seconds (fit, ihvp), plus the seconds
of one HVP pass of those test rows over the training rows (so refine r costs about r + 1 of it).

    .venv/bin/python benchmarks/refine_agreement.py                       # hidden 32, 64, 128 (2.4k-9.6k params)
    .venv/bin/python benchmarks/refine_agreement.py --hidden 32 --test-rows 5 --refine 0,1,2,4
    .venv/bin/python benchmarks/refine_agreement.py --hidden 32 --activation relu --optimizer adam   # not converged
    .venv/bin/python benchmarks/refine_agreement.py --hidden 32 --solvers cg --set weight_decay=0.003   # A indefinite
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from influence_cli import api
from influence_cli.config import load_config
from influence_cli.gradients import GradientSource
from influence_cli.run import Run
from influence_cli.solvers import make_solver

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sample_data" / "digits"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def config_file(work: Path, hidden: int, damping: float, activation: str = "tanh", optimizer: str = "lbfgs") -> Path:
    tag = "" if (activation, optimizer) == ("tanh", "lbfgs") else f"_{activation}_{optimizer}"
    path = work / f"mlp{hidden}{tag}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"arch": "mlp", "kwargs": {"in_features": 64, "hidden": [hidden], "num_classes": 10,
                                            "activation": activation}, "checkpoint": str(work / f"mlp{hidden}{tag}.pt")},
        "weight_decay": 0.01, "params": "all",
        "data": {"train": {"format": "csv", "path": str(DIGITS / "train.csv"), "label": "label", "id": "id", "carry": ["source"]},
                 "test": {"format": "csv", "path": str(DIGITS / "test.csv"), "label": "label", "id": "id", "carry": ["source"]}},
        "solver": {"name": "direct", "damping": damping, "hessian": "exact"},
        "train": ({"optimizer": "lbfgs", "epochs": 1000} if optimizer == "lbfgs"
                  else {"optimizer": optimizer, "epochs": 100, "lr": 0.01, "polish": False}),
        "cache": {"enabled": False}, "output": {"dir": str(work / "out")}}))
    return path


def agreement(train: torch.Tensor, got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    s, r = (train @ got.T).numpy(), (train @ ref.T).numpy()
    per = [spearman(s[:, i], r[:, i]) for i in range(s.shape[1])]
    return float(np.mean(per)), float(np.min(per)), spearman(s.mean(1), r.mean(1))


def bench(path: Path, test_rows: int, refines: list[int], solvers: list[str], overrides: list[str]) -> list[dict]:
    cfg = load_config(path)
    if not Path(cfg.model.checkpoint).exists():
        api.train(cfg)
    cfg = load_config(path, overrides)  # e.g. weight_decay=0.003 on the checkpoint trained at 0.01: A indefinite
    run = Run.open(cfg, "rank", need_test=True)
    problem, source = run.problem, GradientSource(run.problem)
    train = torch.cat([b.grads for b in source.per_example(run.stream(run.train))]).double()
    test = torch.cat([b.grads for b in source.per_example(run.stream(run.test, range(test_rows)))]).double()
    start = time.perf_counter()
    source.hvp(test)
    hvp_pass = time.perf_counter() - start
    rows = []

    def timed(solver, fit=True):
        start = time.perf_counter()
        if fit:
            solver.fit(problem)
        mid = time.perf_counter()
        x = solver.ihvp(test)
        return x, mid - start, time.perf_counter() - mid

    direct = make_solver(cfg.solver)
    ref, fit_s, _ = timed(direct)
    info = direct.describe()
    print(f"  p={problem.params.size} n={problem.n} direct fit {fit_s:.1f}s eig_min {info.get('eig_min', float('nan')):.3g}"
          f" ({info.get('factorization')}); one HVP pass of {test_rows} vectors {hvp_pass:.3f}s")
    for name in solvers:
        levels = refines if name in ("ekfac", "arnoldi") else [None]
        base = None
        for level in levels:
            over = [f"solver.name={name}"] + ([f"solver.{name}.refine={level}"] if level is not None else [])
            solver = make_solver(load_config(path, [*overrides, *over]).solver)
            if base is None:
                x, fit_s, ihvp_s = timed(solver)
                base = solver
            else:  # the same fitted curvature at another refine level
                solver.load_state(base.state(), problem)
                x, _, ihvp_s = timed(solver, fit=False)
            d = solver.describe()
            passes = d.get("refine_hvp_passes", d.get("hvp_passes", 0))
            mean, low, overall = agreement(train, x, ref)
            label = name if level is None else f"{name} refine {level}"
            extra = (f" kept {d.get('refine_kept_unrefined', 0)}/{d.get('refine_solves', 0)}"
                     if level else "")
            print(f"  {label:18s} per-row {mean:.3f} (min {low:.3f}) overall {overall:.3f}  HVP passes {passes:4d}"
                  f"  fit {fit_s:6.2f}s ihvp {ihvp_s:6.2f}s{extra}")
            rows.append({"p": problem.params.size, "solver": label, "spearman_mean": mean, "spearman_min": low,
                         "overall": overall, "hvp_passes": passes, "fit_s": fit_s, "ihvp_s": ihvp_s,
                         "hvp_pass_s": hvp_pass})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="32,64,128")
    parser.add_argument("--test-rows", type=int, default=5)
    parser.add_argument("--refine", default="0,1,2,4,8")
    parser.add_argument("--solvers", default="ekfac,arnoldi,cg,lissa")
    parser.add_argument("--damping", type=float, default=0.001)
    parser.add_argument("--work", default="/tmp/refine_agreement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--activation", default="tanh", help="relu with --optimizer adam: a model not at a minimum")
    parser.add_argument("--optimizer", default="lbfgs")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config overrides after training, for every solver (direct included)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        print(f"MLP 64-{hidden}-10 {args.activation}, {args.optimizer}")
        rows += bench(config_file(work, hidden, args.damping, args.activation, args.optimizer), args.test_rows,
                      [int(r) for r in args.refine.split(",")], args.solvers.split(","), args.overrides)
    frame = pd.DataFrame(rows)
    print(frame.pivot_table(index="solver", columns="p", values="spearman_mean", sort=False).round(3).to_string())


if __name__ == "__main__":
    main()
